# cython: language_level=3
# OpenSSL libcrypto (EVP AEAD ciphers, HMAC): only what the aead framing uses.

cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_MD:
        pass

    const EVP_CIPHER *EVP_chacha20_poly1305()
    const EVP_CIPHER *EVP_aes_256_gcm()
    const EVP_MD *EVP_sha256()

    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *engine,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *engine,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)

    enum:
        EVP_CTRL_AEAD_SET_IVLEN
        EVP_CTRL_AEAD_GET_TAG
        EVP_CTRL_AEAD_SET_TAG


cdef extern from "<openssl/evp.h>" nogil:
    # EVP_MAC: keyed BLAKE2s for the WireGuard handshake gate (_peers.pxi)
    ctypedef struct EVP_MAC:
        pass
    ctypedef struct EVP_MAC_CTX:
        pass
    ctypedef struct OSSL_PARAM:
        pass
    EVP_MAC *EVP_MAC_fetch(void *libctx, const char *algorithm, const char *properties)
    void EVP_MAC_free(EVP_MAC *mac)
    EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac)
    void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx)
    int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen,
                     const OSSL_PARAM *params)
    int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen)
    int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl, size_t outsize)


cdef extern from "<openssl/params.h>" nogil:
    OSSL_PARAM OSSL_PARAM_construct_size_t(const char *key, size_t *buf)
    OSSL_PARAM OSSL_PARAM_construct_end()


cdef extern from "<openssl/core_names.h>" nogil:
    const char *OSSL_MAC_PARAM_SIZE


cdef extern from "<openssl/hmac.h>" nogil:
    unsigned char *HMAC(const EVP_MD *md, const void *key, int key_len,
                        const unsigned char *data, size_t data_len,
                        unsigned char *md_out, unsigned int *md_len)


cdef extern from "<openssl/crypto.h>" nogil:
    void OPENSSL_cleanse(void *ptr, size_t length)
    int CRYPTO_memcmp(const void *a, const void *b, size_t length)
