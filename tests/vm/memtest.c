// Copied from the proven vm-harness recipe; built static into the guest image by build-image.sh.
// memtest: tiny checker for the guest.
//   memtest dax  /dev/daxX.Y [MiB]   mmap a device-dax, write pattern, read back
//   memtest anon MiB                 mmap anonymous memory, touch it, report NUMA node of its pages
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#define MPOL_F_NODE (1<<0)
#define MPOL_F_ADDR (1<<1)
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static int node_of(void *p){int n=-1; if(syscall(SYS_get_mempolicy,&n,NULL,0,p,MPOL_F_NODE|MPOL_F_ADDR)) return -2; return n;}
static int check(uint64_t *a, size_t n, const char *what){
  double t0=now(); for(size_t i=0;i<n;i++) a[i]=i*0x9E3779B97F4A7C15ull ^ 0xC0FFEE;
  double t1=now(); size_t bad=0; for(size_t i=0;i<n;i++) if(a[i]!=(i*0x9E3779B97F4A7C15ull ^ 0xC0FFEE)) bad++;
  double t2=now(); double mb=n*8/1048576.0;
  printf("%s: %zu MiB write %.0f MiB/s read %.0f MiB/s mismatches=%zu -> %s\n",what,(size_t)mb,mb/(t1-t0),mb/(t2-t1),bad,bad?"FAIL":"OK");
  return bad!=0;
}
int main(int argc,char**argv){
  if(argc>=3 && !strcmp(argv[1],"dax")){
    size_t mib = argc>3? strtoul(argv[3],0,0):64; size_t len=mib<<20;
    int fd=open(argv[2],O_RDWR); if(fd<0){perror("open");return 2;}
    void *p=mmap(NULL,len,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0); if(p==MAP_FAILED){perror("mmap");return 3;}
    int r=check(p,len/8,argv[2]);
    printf("dax page node (get_mempolicy): %d\n", node_of(p));
    munmap(p,len); close(fd);
    // re-map and verify persistence of data across mappings
    fd=open(argv[2],O_RDWR); uint64_t *q=mmap(NULL,len,PROT_READ,MAP_SHARED,fd,0); size_t bad=0;
    for(size_t i=0;i<len/8;i++) if(q[i]!=(i*0x9E3779B97F4A7C15ull ^ 0xC0FFEE)) bad++;
    printf("remap readback mismatches=%zu -> %s\n",bad,bad?"FAIL":"OK");
    return r||bad;
  }
  if(argc>=3 && !strcmp(argv[1],"anon")){
    size_t len=strtoul(argv[2],0,0)<<20;
    uint64_t *p=mmap(NULL,len,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); if(p==MAP_FAILED){perror("mmap");return 3;}
    int r=check(p,len/8,"anon");
    int hist[8]={0}; for(size_t off=0;off<len;off+=4096){int n=node_of((char*)p+off); if(n>=0&&n<8) hist[n]++;}
    printf("pages per node:"); for(int i=0;i<8;i++) if(hist[i]) printf(" node%d=%d",i,hist[i]); printf("\n");
    return r;
  }
  fprintf(stderr,"usage: %s dax DEV [MiB] | anon MiB\n",argv[0]); return 1;
}
