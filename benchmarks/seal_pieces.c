/* What sealing a packet in pieces costs OpenSSL's ChaCha20-Poly1305
 * (benchmarks/RESULTS.md, issue 9: why a TSO segment is copied whole
 * before it is sealed).  Each packet is sealed as the data path does it:
 * nonce set, one EVP_EncryptUpdate per piece, final, tag; the payloads
 * walk a 64 KiB buffer as a super-packet's segments do.
 *
 *   cc -O2 -o /tmp/seal_pieces benchmarks/seal_pieces.c -lcrypto
 *   /tmp/seal_pieces HEAD DATA TAIL      e.g. 52 1348 12 (three pieces)
 *   /tmp/seal_pieces 0 1408 0            (one piece)
 *   /tmp/seal_pieces -copy 1408          (the payload copied behind its headers, one piece)
 */
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int copy = argc > 1 && strcmp(argv[1], "-copy") == 0;
    if (argc != (copy ? 3 : 4)) {
        fprintf(stderr, "usage: %s HEAD DATA TAIL | -copy LENGTH\n", argv[0]);
        return 2;
    }
    int head = copy ? 52 : atoi(argv[1]);
    int data = copy ? atoi(argv[2]) - 52 : atoi(argv[2]);
    int tail = copy ? 0 : atoi(argv[3]);
    unsigned char key[32] = {1}, nonce[12] = {0}, tag[16], pieces[256];
    unsigned char *super = malloc(65536), *out = malloc(2048 * 2048);
    memset(super, 7, 65536);
    memset(pieces, 3, sizeof pieces);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL);
    int n = 400000, len;
    double began = now();
    for (int i = 0; i < n; i++) {
        unsigned char *payload = super + (size_t)(i * 1400) % 60000;
        memcpy(nonce + 4, &i, 4);
        EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce);
        if (copy) {
            unsigned char *whole = out + (size_t)(i % 2048) * 2048;
            memcpy(whole, pieces, head);
            memcpy(whole + head, payload, data);
            EVP_EncryptUpdate(ctx, whole, &len, whole, head + data);
        } else {
            if (head) EVP_EncryptUpdate(ctx, pieces, &len, pieces, head);
            EVP_EncryptUpdate(ctx, payload, &len, payload, data);
            if (tail) EVP_EncryptUpdate(ctx, pieces + 128, &len, pieces + 128, tail);
        }
        EVP_EncryptFinal_ex(ctx, tag, &len);
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag);
    }
    double took = now() - began;
    printf("%s head %d data %d tail %d: %.0f ns a packet\n", copy ? "copied," : "pieces,",
           head, data, tail, took / n * 1e9);
    EVP_CIPHER_CTX_free(ctx);
    free(super);
    free(out);
    return 0;
}
