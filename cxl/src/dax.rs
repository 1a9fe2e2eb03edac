//! The `dax:/dev/daxX.Y` backing: a device-dax character device (CXL Type-3 memory or pmem in devdax
//! mode) mapped `MAP_SHARED`.
//!
//! device-dax only maps in multiples of its alignment (`/sys/bus/dax/devices/daxX.Y/align`, 2 MiB by
//! default: the PMD size on x86-64, `Documentation/ABI/testing/sysfs-bus-dax`), so the length is
//! rounded up to it and must fit in the device's `size`. A device that does not exist, is not a
//! device-dax instance, or is too small is a `Config` error naming it.
//!
//! Invariant: the returned [`Region`] owns both the mapping and the device fd.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use farpool_core::size::format_bytes;
use farpool_core::{Error, ErrorKind, Result};

use crate::backing::HUGE_PAGE_SIZE;
use crate::region::Region;

/// mmap `len` bytes of `fd` shared, read-write; the region takes ownership of mapping and fd.
pub(crate) fn map_fd(fd: OwnedFd, len: usize, desc: String) -> Result<Region> {
    // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory is affected.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(Error::new(ErrorKind::Io, format!("mmap of {desc} failed")).with_source(e));
    }
    let p = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::new(ErrorKind::Internal, "mmap returned NULL"))?;
    // SAFETY: fresh shared mapping of `len` bytes, owned by the region from here on.
    Ok(unsafe { Region::from_raw(p, len, Some(fd), desc) })
}

fn read_num(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Map `len` bytes (rounded up to the device alignment) of the device-dax at `dev`, reading its size
/// and alignment from sysfs under `root` (`/` normally).
pub fn map_at(root: &Path, dev: &Path, len: usize) -> Result<Region> {
    let shown = dev.display();
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !dev.exists() {
        return Err(Error::new(ErrorKind::Config, format!("dax device {shown} does not exist")));
    }
    let sys = root.join("sys/bus/dax/devices").join(name);
    let size = read_num(&sys.join("size")).ok_or_else(|| {
        Error::new(ErrorKind::Config, format!("{shown} is not a device-dax instance ({} missing)", sys.display()))
    })?;
    let align = read_num(&sys.join("align")).filter(|a| a.is_power_of_two()).unwrap_or(HUGE_PAGE_SIZE as u64);
    let len = (len as u64).div_ceil(align) * align;
    if len > size {
        return Err(Error::new(
            ErrorKind::Config,
            format!("dax device {shown} holds {} but {} was asked for", format_bytes(size), format_bytes(len)),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| Error::new(ErrorKind::Config, format!("cannot open dax device {shown}")).with_source(e))?;
    let len = usize::try_from(len).map_err(|_| Error::new(ErrorKind::Config, "dax length overflows usize"))?;
    let desc = format!("dax {shown} {} (align {})", format_bytes(len as u64), format_bytes(align));
    map_fd(OwnedFd::from(file), len, desc)
}

/// Map `len` bytes of the device-dax at `dev` (sysfs at `/sys`).
pub fn map(dev: &Path, len: usize) -> Result<Region> {
    map_at(Path::new("/"), dev, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_clear_config_error() {
        let e = map(Path::new("/dev/dax9.9"), 4 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("/dev/dax9.9 does not exist"), "{e}");
    }

    #[test]
    fn non_dax_file_and_too_small_device_are_config_errors() {
        let t = crate::topology::tests::TempDir::new("dax");
        let dev = t.0.join("dax0.0");
        std::fs::write(&dev, vec![0u8; 4096]).unwrap();
        let e = map_at(&t.0, &dev, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("not a device-dax"), "{e}");
        crate::topology::tests::guest_tree(&t.0);
        let e = map_at(&t.0, &dev, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("holds 512MiB but 1GiB was asked for"), "{e}");
    }

    #[test]
    #[ignore = "needs a device-dax (/dev/daxX.Y): runs in the qemu guest via farpool-vm-cxl"]
    fn maps_a_real_device() {
        let topo = crate::topology::Topology::discover().unwrap();
        let d = topo.dax.iter().find(|d| d.is_devdax()).expect("no devdax device");
        let r = map(&d.dev_path(), 2 << 20).unwrap();
        r.write_at(0, b"dax").unwrap();
        let mut b = [0; 3];
        r.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"dax");
    }
}
