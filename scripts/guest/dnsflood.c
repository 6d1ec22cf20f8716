/* A hostile guest's DNS-over-TCP client (issue 11): connect to GATEWAY:53 and pipeline
 * queries as fast as the connection takes them, never reading an answer, until MAX_BYTES
 * are sent, MAX_SECONDS pass, or the window stays shut for 3 s (moat stopped reading).
 * Prints "sent=BYTES seconds=S stalled=0|1". Built static (gcc -static) into the guest image
 * by scripts/build-guest.sh.
 * Usage: dnsflood GATEWAY MAX_BYTES MAX_SECONDS */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: dnsflood GATEWAY MAX_BYTES MAX_SECONDS\n");
    return 2;
  }
  long long max_bytes = atoll(argv[2]);
  double max_seconds = atof(argv[3]);
  struct sockaddr_in gw = {.sin_family = AF_INET, .sin_port = htons(53)};
  if (inet_pton(AF_INET, argv[1], &gw.sin_addr) != 1) {
    fprintf(stderr, "dnsflood: bad address %s\n", argv[1]);
    return 2;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct timeval tv = {.tv_sec = 3};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (fd < 0 || connect(fd, (struct sockaddr *)&gw, sizeof gw) != 0) {
    printf("sent=0 seconds=0 stalled=0 error=%s\n", strerror(errno));
    return 1;
  }
  /* One query for flood.test A (id 0x1234, RD), behind its two-byte length. */
  static const unsigned char query[] = {
      0x00, 0x1c, 0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
      0x00, 0x00, 0x05, 'f',  'l',  'o',  'o',  'd',  0x04, 't',  'e',  's',
      't',  0x00, 0x00, 0x01, 0x00, 0x01};
  static unsigned char chunk[sizeof query * 512];
  for (size_t i = 0; i < sizeof chunk; i += sizeof query) memcpy(chunk + i, query, sizeof query);
  long long sent = 0;
  int stalled = 0;
  double start = now();
  while (sent < max_bytes && now() - start < max_seconds) {
    ssize_t n = send(fd, chunk, sizeof chunk, MSG_NOSIGNAL);
    if (n > 0) {
      sent += n;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      stalled = 1; /* nothing taken for 3 s: the window is shut */
      break;
    } else if (n < 0 && errno != EINTR) {
      break;
    }
  }
  printf("sent=%lld seconds=%.1f stalled=%d\n", sent, now() - start, stalled);
  return 0;
}
