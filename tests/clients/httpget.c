/* A statically linked HTTP/1.0 client for the end-to-end tests: musl's own resolver and plain
 * sockets, no libc hooks.  Usage: httpget HOST PORT PATH  -> prints the response, exit 0. */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT PATH\n", argv[0]);
        return 2;
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *found;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &found);
    if (rc != 0) {
        fprintf(stderr, "resolve %s: %s\n", argv[1], gai_strerror(rc));
        return 1;
    }
    int fd = socket(found->ai_family, found->ai_socktype, 0);
    if (fd < 0 || connect(fd, found->ai_addr, found->ai_addrlen) != 0) {
        perror("connect");
        return 1;
    }
    char request[512];
    int n = snprintf(request, sizeof request, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", argv[3],
                     argv[1]);
    if (write(fd, request, n) != n) {
        perror("write");
        return 1;
    }
    char buffer[4096];
    ssize_t got;
    while ((got = read(fd, buffer, sizeof buffer)) > 0) fwrite(buffer, 1, got, stdout);
    close(fd);
    return got < 0 ? 1 : 0;
}
