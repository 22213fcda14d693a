// The C peer of UblkSharp.Bench's binding benchmark: the same NOP-batch and 4 KiB random-read
// loops over liburing, so the managed binding is measured as a ratio in one run.
// build: gcc -O2 -o liburing-bench liburing-bench.c -luring
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

// Process CPU time (io-wq workers included): a rate per CPU-second does not drop when other load on a
// shared host takes the CPU away, which a rate per wall-clock second does.
static double cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct rate { double wall, cpu; };

static uint64_t next_offset(uint64_t *s, uint64_t blocks) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s % blocks * 4096;
}

static int setup(struct io_uring *ring, unsigned entries) {
  return io_uring_queue_init(entries, ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
}

static struct rate nop(double seconds) {
  struct io_uring ring;
  struct io_uring_cqe *cqe;
  if (setup(&ring, 64) < 0) { perror("setup"); exit(1); }
  long ops = 0;
  double start = now(), end = start + seconds, cpu0 = cpu();
  while (now() < end) {
    for (int k = 0; k < 1000; k++) {
      for (int i = 0; i < 32; i++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        io_uring_prep_nop(sqe);
        sqe->user_data = i;
      }
      io_uring_submit_and_wait(&ring, 32);
      unsigned head, n = 0;
      io_uring_for_each_cqe(&ring, head, cqe) n++;
      io_uring_cq_advance(&ring, n);
      ops += n;
    }
  }
  struct rate rate = {ops / (now() - start), ops / (cpu() - cpu0)};
  io_uring_queue_exit(&ring);
  return rate;
}

static struct rate readbench(int fd, uint64_t size, double seconds) {
  enum { depth = 32, block = 4096 };
  struct io_uring ring;
  struct io_uring_cqe *cqe;
  if (setup(&ring, depth * 2) < 0) { perror("setup"); exit(1); }
  char *buf = aligned_alloc(4096, depth * block);
  uint64_t blocks = size / block, rng = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < depth; i++) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_read(sqe, fd, buf + i * block, block, next_offset(&rng, blocks));
    sqe->user_data = i;
  }
  long ops = 0;
  double start = now(), end = start + seconds, cpu0 = cpu();
  while (now() < end) {
    io_uring_submit_and_wait(&ring, 1);
    unsigned head, n = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      if (cqe->res != block) { fprintf(stderr, "read failed: %d\n", cqe->res); exit(1); }
      uint64_t slot = cqe->user_data;
      struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
      io_uring_prep_read(sqe, fd, buf + slot * block, block, next_offset(&rng, blocks));
      sqe->user_data = slot;
      n++;
    }
    io_uring_cq_advance(&ring, n);
    ops += n;
  }
  struct rate rate = {ops / (now() - start), ops / (cpu() - cpu0)};
  io_uring_queue_exit(&ring);
  free(buf);
  return rate;
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 3;
  const char *path = argc > 2 ? argv[2] : "/dev/shm/ublksharp-bench.dat";
  int fd = open(path, O_RDONLY);
  if (fd < 0) { perror(path); return 1; }
  off_t size = lseek(fd, 0, SEEK_END);
  nop(0.3);
  struct rate n = nop(seconds);
  readbench(fd, size, 0.3);
  struct rate r = readbench(fd, size, seconds);
  printf("nop_batch32_ops_per_s %.0f\nnop_batch32_ops_per_cpu_s %.0f\n", n.wall, n.cpu);
  printf("read4k_qd32_ops_per_s %.0f\nread4k_qd32_ops_per_cpu_s %.0f\n", r.wall, r.cpu);
  close(fd);
  return 0;
}
