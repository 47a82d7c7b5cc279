#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned char *buf;
    size_t cap, head, len;
} ring_t;

int ring_init(ring_t *r, size_t cap) {
    r->buf = malloc(cap);
    if (!r->buf) return -1;
    r->cap = cap;
    r->head = r->len = 0;
    return 0;
}

size_t ring_write(ring_t *r, const unsigned char *src, size_t n) {
    size_t i;
    for (i = 0; i < n && r->len < r->cap; i++) {
        r->buf[(r->head + r->len) % r->cap] = src[i];
        r->len++;
    }
    return i;
}

size_t ring_read(ring_t *r, unsigned char *dst, size_t n) {
    size_t i;
    for (i = 0; i < n && r->len > 0; i++) {
        dst[i] = r->buf[r->head];
        r->head = (r->head + 1) % r->cap;
        r->len--;
    }
    return i;
}
