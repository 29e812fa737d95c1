/* netsim's optional native accelerator (docs/native.md): the per-packet work batching leaves, one call per batch.
 *
 *   Aead(key)                       ChaCha20-Poly1305 (RFC 8439) through OpenSSL's EVP, one context per direction,
 *                                   initialised with the key once; each message only sets its nonce.
 *   seal_batch(...)                 WireGuard transport messages (whitepaper §5.4.6): header, zero padding, AEAD.
 *   open_batch(datagrams, keys)     decrypt every transport message of a batch whose receiver index is in `keys`.
 *   fold16(data, skip)              the one's complement sum of RFC 1071, folded to 16 bits.
 *   tun_read / tun_write            a batch of read(2) / write(2) calls on a non-blocking fd, errno returned.
 *   udp_recv(...)                   one recvmmsg(2) into the caller's buffers: sizes, sources, UDP GRO sizes.
 *
 * A Python buffer export (__buffer__) may run code that changes the caller's list: the batch functions copy their
 * sequences into tuples, and seal_batch (once per run, where a copy would cost per packet) holds each item while it
 * takes its buffer and checks the lengths on every step.
 *
 * No cryptography is written here: the AEAD is OpenSSL's (libcrypto from the distribution). Every length is
 * checked before it is used; bad arguments raise ValueError/TypeError, never touch memory out of bounds. The
 * pure-Python reference of each function is in netsim/accel.py and tests/test_native.py compares the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define TAG_LEN 16
#define HEADER_LEN 16
#define MSG_TRANSPORT 4
#define MAX_PACKET 65535

static const uint8_t ZEROS[16] = {0};

static inline void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void put_le64(uint8_t *p, uint64_t v) {
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

static inline uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t get_le64(const uint8_t *p) { return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32); }

/* ------------------------------------------------------------------ Aead */

typedef struct {
    PyObject_HEAD EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
} AeadObject;

static void Aead_dealloc(AeadObject *self) {
    EVP_CIPHER_CTX_free(self->enc); /* frees (and cleanses) the key schedule; NULL is fine */
    EVP_CIPHER_CTX_free(self->dec);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Aead_init(AeadObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:Aead", kwlist, &key)) return -1;
    if (key.len != 32) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "ChaCha20-Poly1305 key must be 32 bytes, got %zd", key.len);
        return -1;
    }
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    int ok = self->enc != NULL && self->dec != NULL &&
             EVP_EncryptInit_ex(self->enc, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1 &&
             EVP_DecryptInit_ex(self->dec, EVP_chacha20_poly1305(), NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up ChaCha20-Poly1305");
        return -1;
    }
    return 0;
}

/* ciphertext || tag of in[0:n] followed by (padded - n) zero bytes; out holds padded + TAG_LEN bytes */
static int seal_one(EVP_CIPHER_CTX *c, const uint8_t nonce[12], const uint8_t *in, int n, int padded, uint8_t *out) {
    int len = 0;
    if (EVP_EncryptInit_ex(c, NULL, NULL, NULL, nonce) != 1) return 0;
    if (n > 0 && EVP_EncryptUpdate(c, out, &len, in, n) != 1) return 0;
    if (padded > n && EVP_EncryptUpdate(c, out + n, &len, ZEROS, padded - n) != 1) return 0;
    if (EVP_EncryptFinal_ex(c, out + padded, &len) != 1) return 0;
    return EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, out + padded) == 1;
}

/* 1: authentic, plaintext in out[0:n]; 0: bad tag; -1: OpenSSL error */
static int open_one(EVP_CIPHER_CTX *c, const uint8_t nonce[12], const uint8_t *in, int n, const uint8_t *tag,
                    uint8_t *out) {
    int len = 0;
    if (EVP_DecryptInit_ex(c, NULL, NULL, NULL, nonce) != 1) return -1;
    if (n > 0 && EVP_DecryptUpdate(c, out, &len, in, n) != 1) return -1;
    if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, (void *)tag) != 1) return -1;
    return EVP_DecryptFinal_ex(c, out + n, &len) == 1 ? 1 : 0;
}

static PyObject *Aead_encrypt(AeadObject *self, PyObject *args) {
    Py_buffer nonce, data;
    if (!PyArg_ParseTuple(args, "y*y*:encrypt", &nonce, &data)) return NULL;
    PyObject *res = NULL;
    if (nonce.len != 12 || data.len > MAX_PACKET) {
        PyErr_SetString(PyExc_ValueError, "encrypt: the nonce must be 12 bytes and the data at most 65535");
        goto done;
    }
    res = PyBytes_FromStringAndSize(NULL, data.len + TAG_LEN);
    if (res == NULL) goto done;
    if (!seal_one(self->enc, nonce.buf, data.buf, (int)data.len, (int)data.len, (uint8_t *)PyBytes_AS_STRING(res))) {
        Py_CLEAR(res);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 encryption failed");
    }
done:
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&data);
    return res;
}

static PyObject *Aead_decrypt(AeadObject *self, PyObject *args) {
    Py_buffer nonce, data;
    if (!PyArg_ParseTuple(args, "y*y*:decrypt", &nonce, &data)) return NULL;
    PyObject *res = NULL;
    if (nonce.len != 12 || data.len < TAG_LEN || data.len > MAX_PACKET + TAG_LEN) {
        PyErr_SetString(PyExc_ValueError, "decrypt: the nonce must be 12 bytes and the data 16..65551");
        goto done;
    }
    int n = (int)data.len - TAG_LEN;
    res = PyBytes_FromStringAndSize(NULL, n);
    if (res == NULL) goto done;
    const uint8_t *in = data.buf;
    int r = open_one(self->dec, nonce.buf, in, n, in + n, (uint8_t *)PyBytes_AS_STRING(res));
    if (r != 1) {
        Py_CLEAR(res);
        if (r == 0) {
            Py_INCREF(Py_None);
            res = Py_None; /* authentication failed: the caller counts it */
        } else {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 decryption failed");
        }
    }
done:
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&data);
    return res;
}

static PyMethodDef Aead_methods[] = {
    {"encrypt", (PyCFunction)Aead_encrypt, METH_VARARGS,
     "encrypt(nonce12, plaintext) -> ciphertext || tag (no associated data)."},
    {"decrypt", (PyCFunction)Aead_decrypt, METH_VARARGS,
     "decrypt(nonce12, ciphertext || tag) -> plaintext, or None when the tag is wrong."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AeadType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "netsim._native._accel.Aead",
    .tp_doc = "Aead(key): ChaCha20-Poly1305 (OpenSSL EVP) under one 32-byte key, a context per direction.",
    .tp_basicsize = sizeof(AeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Aead_init,
    .tp_dealloc = (destructor)Aead_dealloc,
    .tp_methods = Aead_methods,
};

/* ------------------------------------------------------------------ WireGuard transport batches */

/* seal_batch(aead, remote_index, counter, mtu, packets, out_bufs, indices) -> next counter
 *
 * For each i of `indices` (a list of ints; None: every packet), writes into out_bufs[i] the transport message for
 * packets[i] under `counter`, `counter + 1`, ...: type 4, reserved zeros, remote_index (u32 LE), the counter (u64
 * LE), then the AEAD of the packet zero-padded to a multiple of 16 but never past `mtu` (whitepaper §5.4.6), with
 * the nonce 0^32 || counter LE. The caller checked that every buffer is large enough; one that is not raises
 * ValueError (the counters used so far stay used: the return value is lost, the caller must not reuse them).
 */
static PyObject *seal_batch(PyObject *mod, PyObject *args) {
    PyObject *aead, *packets, *outs, *indices;
    unsigned long remote_index;
    unsigned long long counter;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "O!kKnOOO:seal_batch", &AeadType, &aead, &remote_index, &counter, &mtu, &packets,
                          &outs, &indices))
        return NULL;
    if (remote_index > 0xFFFFFFFFUL || mtu < 0 || mtu > INT_MAX - 64) {
        PyErr_SetString(PyExc_ValueError, "seal_batch: remote_index must be a u32 and mtu 0..INT_MAX - 64");
        return NULL;
    }
    EVP_CIPHER_CTX *c = ((AeadObject *)aead)->enc;
    /* not copied (this runs once per run of a batch): every item is held while used, the lengths checked each time */
    PyObject *pk = PySequence_Fast(packets, "seal_batch: packets must be a sequence");
    if (pk == NULL) return NULL;
    PyObject *ob = PySequence_Fast(outs, "seal_batch: out_bufs must be a sequence");
    if (ob == NULL) {
        Py_DECREF(pk);
        return NULL;
    }
    PyObject *ix = NULL;
    Py_ssize_t count;
    if (indices == Py_None) {
        count = PySequence_Fast_GET_SIZE(pk);
    } else {
        ix = PySequence_Tuple(indices);
        if (ix == NULL) goto fail;
        count = PySequence_Fast_GET_SIZE(ix);
    }
    uint8_t nonce[12] = {0};
    for (Py_ssize_t j = 0; j < count; j++) {
        Py_ssize_t i = j;
        if (ix != NULL) {
            i = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(ix, j));
            if (i == -1 && PyErr_Occurred()) goto fail;
        }
        if (i < 0 || i >= PySequence_Fast_GET_SIZE(pk) || i >= PySequence_Fast_GET_SIZE(ob)) {
            PyErr_Format(PyExc_ValueError, "seal_batch: index %zd out of range", i);
            goto fail;
        }
        Py_buffer in, out;
        PyObject *pkt_obj = PySequence_Fast_GET_ITEM(pk, i), *out_obj = PySequence_Fast_GET_ITEM(ob, i);
        Py_INCREF(pkt_obj);
        Py_INCREF(out_obj);
        int got = PyObject_GetBuffer(pkt_obj, &in, PyBUF_SIMPLE);
        if (got == 0 && PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE) < 0) {
            PyBuffer_Release(&in);
            got = -1;
        }
        Py_DECREF(pkt_obj); /* the buffers hold their exporters from here on */
        Py_DECREF(out_obj);
        if (got < 0) goto fail;
        Py_ssize_t n = in.len;
        Py_ssize_t padded = (n + 15) & ~(Py_ssize_t)15;
        if (padded > mtu) padded = n > mtu ? n : mtu;
        int ok = 0;
        if (n > INT_MAX - 64 || out.len < padded + HEADER_LEN + TAG_LEN) {
            PyErr_Format(PyExc_ValueError, "seal_batch: packet %zd (%zd bytes) does not fit its %zd-byte buffer", i,
                         n, out.len);
        } else {
            uint8_t *o = out.buf;
            put_le32(o, MSG_TRANSPORT);
            put_le32(o + 4, (uint32_t)remote_index);
            put_le64(o + 8, (uint64_t)counter);
            put_le64(nonce + 4, (uint64_t)counter);
            counter++;
            ok = seal_one(c, nonce, in.buf, (int)n, (int)padded, o + HEADER_LEN);
            if (!ok) PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 encryption failed");
        }
        PyBuffer_Release(&in);
        PyBuffer_Release(&out);
        if (!ok) goto fail;
    }
    Py_DECREF(pk);
    Py_DECREF(ob);
    Py_XDECREF(ix);
    return PyLong_FromUnsignedLongLong(counter);
fail:
    Py_DECREF(pk);
    Py_DECREF(ob);
    Py_XDECREF(ix);
    return NULL;
}

/* open_batch(datagrams, keys) -> list, one entry per datagram:
 *   bytes  the plaintext (padding included) of an authentic transport message
 *   False  a transport message under a known index whose tag is wrong
 *   None   not tried: shorter than 32 bytes, not type 4 with zero reserved bytes, or receiver index not in `keys`
 * `keys` maps receiver index (int) -> Aead. Nothing is checked beyond authentication (replay, inner packet:
 * the caller's). */
static PyObject *open_batch(PyObject *mod, PyObject *args) {
    PyObject *datagrams, *keys;
    if (!PyArg_ParseTuple(args, "OO!:open_batch", &datagrams, &PyDict_Type, &keys)) return NULL;
    PyObject *dg = PySequence_Tuple(datagrams);
    if (dg == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(dg);
    PyObject *res = PyList_New(count);
    if (res == NULL) {
        Py_DECREF(dg);
        return NULL;
    }
    uint8_t nonce[12] = {0};
    uint32_t last_index = 0;
    PyObject *last_aead = NULL; /* borrowed from `keys` */
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_buffer in;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(dg, i), &in, PyBUF_SIMPLE) < 0) goto fail;
        PyObject *item = Py_None;
        const uint8_t *p = in.buf;
        if (in.len >= HEADER_LEN + TAG_LEN && in.len <= INT_MAX - 64 && get_le32(p) == MSG_TRANSPORT) {
            uint32_t receiver = get_le32(p + 4);
            PyObject *aead = NULL;
            if (last_aead != NULL && receiver == last_index) {
                aead = last_aead;
            } else {
                PyObject *key = PyLong_FromUnsignedLong(receiver);
                if (key == NULL) {
                    PyBuffer_Release(&in);
                    goto fail;
                }
                aead = PyDict_GetItemWithError(keys, key);
                Py_DECREF(key);
                if (aead == NULL && PyErr_Occurred()) {
                    PyBuffer_Release(&in);
                    goto fail;
                }
                if (aead != NULL && !PyObject_TypeCheck(aead, &AeadType)) {
                    PyBuffer_Release(&in);
                    PyErr_SetString(PyExc_TypeError, "open_batch: keys must map int -> Aead");
                    goto fail;
                }
                last_aead = aead;
                last_index = receiver;
            }
            if (aead != NULL) {
                int n = (int)in.len - HEADER_LEN - TAG_LEN;
                PyObject *plain = PyBytes_FromStringAndSize(NULL, n);
                if (plain == NULL) {
                    PyBuffer_Release(&in);
                    goto fail;
                }
                memcpy(nonce + 4, p + 8, 8); /* the counter, already little-endian */
                int r = open_one(((AeadObject *)aead)->dec, nonce, p + HEADER_LEN, n, p + in.len - TAG_LEN,
                                 (uint8_t *)PyBytes_AS_STRING(plain));
                if (r == 1) {
                    item = plain;
                } else {
                    Py_DECREF(plain);
                    if (r < 0) {
                        PyBuffer_Release(&in);
                        PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 decryption failed");
                        goto fail;
                    }
                    item = Py_False;
                }
            }
        }
        PyBuffer_Release(&in);
        if (item == Py_None || item == Py_False) Py_INCREF(item);
        PyList_SET_ITEM(res, i, item);
    }
    Py_DECREF(dg);
    return res;
fail:
    Py_DECREF(dg);
    Py_DECREF(res); /* unset slots are NULL: list dealloc skips them */
    return NULL;
}

/* ------------------------------------------------------------------ checksums */

/* fold16(data, skip=-1) -> int: the RFC 1071 sum of `data` as 16-bit big-endian words (odd length zero-padded),
 * with the two bytes at `skip` read as zero (a checksum field), folded with end-around carry to 0..0xFFFF. The
 * result is 0 exactly when every byte counted is zero, and is congruent to the sum modulo 0xFFFF. */
static PyObject *fold16(PyObject *mod, PyObject *args) {
    Py_buffer in;
    Py_ssize_t skip = -1;
    if (!PyArg_ParseTuple(args, "y*|n:fold16", &in, &skip)) return NULL;
    if (skip != -1 && (skip < 0 || skip + 2 > in.len)) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "fold16: skip must be -1 or leave two bytes inside the data");
        return NULL;
    }
    const uint8_t *p = in.buf;
    Py_ssize_t n = in.len, k = 0;
    uint64_t sum = 0;
    /* 2^16 = 1 (mod 0xFFFF): a 32-bit big-endian word sums like its two 16-bit halves */
    for (; k + 4 <= n; k += 4) sum += ((uint32_t)p[k] << 24) | ((uint32_t)p[k + 1] << 16) | ((uint32_t)p[k + 2] << 8) | p[k + 3];
    for (; k + 2 <= n; k += 2) sum += ((uint32_t)p[k] << 8) | p[k + 1];
    if (k < n) sum += (uint32_t)p[k] << 8;
    if (skip >= 0) { /* take the two skipped bytes back out, each at the weight the loops above gave it, so the
                        sum stays exact (0 only when every byte counted is zero) */
        Py_ssize_t n4 = n & ~(Py_ssize_t)3, n2 = n & ~(Py_ssize_t)1;
        for (Py_ssize_t b = skip; b < skip + 2; b++) {
            int shift = b < n4 ? 8 * (3 - (int)(b & 3)) : b < n2 ? 8 * (1 - (int)(b & 1)) : 8;
            sum -= (uint64_t)p[b] << shift;
        }
    }
    PyBuffer_Release(&in);
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    return PyLong_FromUnsignedLong((unsigned long)sum);
}

/* ------------------------------------------------------------------ TUN batches */

static int is_queue_full(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == EINPROGRESS || e == EALREADY || e == ENOBUFS; }

static int is_gone(int e) { return e == EBADFD || e == ENODEV || e == ENXIO || e == EBADF; }

/* tun_read(fd, limit, size, hdr4, hdr6) -> (packets, empty, truncated, nbytes, errno)
 *
 * read(2)s of up to `size` bytes from non-blocking `fd` until `limit` packets were kept or the fd has nothing
 * more (EAGAIN: errno 0 in the result). A read of 0 bytes counts as `empty`, one of more than size - 1 bytes as
 * `truncated` (the caller reads mtu + 1 to see it); neither is kept. Kept packets are bytes, prefixed with hdr4 or
 * hdr6 (equal lengths, 0..8 bytes) by the version nibble (utun framing). Any other errno stops the batch and is
 * returned with what was read before it. */
static PyObject *tun_read(PyObject *mod, PyObject *args) {
    int fd;
    Py_ssize_t limit, size;
    Py_buffer h4, h6;
    if (!PyArg_ParseTuple(args, "inny*y*:tun_read", &fd, &limit, &size, &h4, &h6)) return NULL;
    PyObject *out = NULL;
    if (size < 2 || size > MAX_PACKET + 1 || h4.len != h6.len || h4.len > 8 || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "tun_read: size 2..65536, limit >= 0, headers of one length <= 8");
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL) goto done;
    static uint8_t buf[8 + MAX_PACKET + 1]; /* the GIL is held throughout: one buffer is enough */
    Py_ssize_t hl = h4.len, empty = 0, truncated = 0, nbytes = 0;
    int err = 0;
    while (PyList_GET_SIZE(out) < limit) {
        ssize_t r = read(fd, buf + hl, (size_t)size);
        if (r < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    Py_CLEAR(out);
                    goto done;
                }
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
            break;
        }
        if (r == 0) {
            empty++;
            continue;
        }
        if (r > size - 1) {
            truncated++;
            continue;
        }
        if (hl) memcpy(buf, (buf[hl] >> 4) == 6 ? h6.buf : h4.buf, (size_t)hl);
        PyObject *pkt = PyBytes_FromStringAndSize((const char *)buf, r + hl);
        if (pkt == NULL || PyList_Append(out, pkt) < 0) {
            Py_XDECREF(pkt);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(pkt);
        nbytes += r;
    }
    PyObject *res = Py_BuildValue("(Nnnni)", out, empty, truncated, nbytes, err);
    PyBuffer_Release(&h4);
    PyBuffer_Release(&h6);
    return res;
done:
    PyBuffer_Release(&h4);
    PyBuffer_Release(&h6);
    return out;
}

/* tun_write(fd, packets, offset, hdr4, hdr6, mtu, check) -> (accepted, nbytes, drops, errno)
 *
 * One write(2) per packet of packets[i][offset:]. With `check`, a packet is first dropped (counted in `drops`, a
 * tuple (bad_family, empty, too_big, queue_full, rejected)) when, with headers (hdr4/hdr6 of one length), it does
 * not start with one of them (which is then stripped), is empty, or is longer than `mtu`. A refused write counts
 * as queue_full (EAGAIN, ENOBUFS) or rejected; an errno meaning the device is gone (EBADFD, ENODEV, ENXIO, EBADF)
 * stops the batch and is returned. */
static PyObject *tun_write(PyObject *mod, PyObject *args) {
    int fd, check;
    PyObject *packets;
    Py_ssize_t offset, mtu;
    Py_buffer h4, h6;
    if (!PyArg_ParseTuple(args, "iOny*y*np:tun_write", &fd, &packets, &offset, &h4, &h6, &mtu, &check)) return NULL;
    PyObject *res = NULL, *seq = NULL;
    if (offset < 0 || h4.len != h6.len || h4.len > 8) {
        PyErr_SetString(PyExc_ValueError, "tun_write: offset >= 0, headers of one length <= 8");
        goto done;
    }
    seq = PySequence_Tuple(packets);
    if (seq == NULL) goto done;
    Py_ssize_t hl = h4.len, accepted = 0, nbytes = 0;
    Py_ssize_t bad_family = 0, empty = 0, too_big = 0, queue_full = 0, rejected = 0;
    int err = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && !err; i++) {
        Py_buffer pb;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &pb, PyBUF_SIMPLE) < 0) goto done;
        const uint8_t *p = (const uint8_t *)pb.buf + (offset < pb.len ? offset : pb.len);
        Py_ssize_t n = offset < pb.len ? pb.len - offset : 0;
        if (check) {
            if (hl) {
                if (n < hl || (memcmp(p, h4.buf, (size_t)hl) != 0 && memcmp(p, h6.buf, (size_t)hl) != 0)) {
                    bad_family++;
                    PyBuffer_Release(&pb);
                    continue;
                }
                p += hl;
                n -= hl;
            }
            if (n == 0 || n > mtu) {
                if (n == 0)
                    empty++;
                else
                    too_big++;
                PyBuffer_Release(&pb);
                continue;
            }
        }
        ssize_t w;
        for (;;) {
            w = write(fd, p, (size_t)n);
            if (w >= 0 || errno != EINTR) break;
            if (PyErr_CheckSignals() < 0) {
                PyBuffer_Release(&pb);
                goto done;
            }
        }
        PyBuffer_Release(&pb);
        if (w < 0) {
            if (is_queue_full(errno))
                queue_full++;
            else if (is_gone(errno))
                err = errno;
            else
                rejected++;
            continue;
        }
        accepted++;
        nbytes += check ? n : w;
    }
    res = Py_BuildValue("(nn(nnnnn)i)", accepted, nbytes, bad_family, empty, too_big, queue_full, rejected, err);
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&h4);
    PyBuffer_Release(&h6);
    return res;
}

/* ------------------------------------------------------------------ udp_recv */

#define UDP_RECV_MAX 256 /* messages per call (the driver asks for its batch, 64 by default) */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

static struct sockaddr_storage last_name; /* the GIL is held throughout: one cache of the last source's tuple */
static socklen_t last_namelen;
static PyObject *last_addr;

static int is_transient_recv(int e) {
    return e == ECONNREFUSED || e == EHOSTUNREACH || e == ENETUNREACH || e == EHOSTDOWN || e == ENETDOWN;
}

/* (host, port) as socket.recvfrom gives it (addr[:2] for IPv6), the same tuple object while the source repeats */
static PyObject *source_tuple(const struct sockaddr_storage *name, socklen_t len) {
    if (last_addr != NULL && len == last_namelen && memcmp(name, &last_name, (size_t)len) == 0) {
        Py_INCREF(last_addr);
        return last_addr;
    }
    char host[INET6_ADDRSTRLEN];
    unsigned port;
    if (name->ss_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)name;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof host) == NULL) return PyErr_SetFromErrno(PyExc_OSError);
        port = ntohs(a->sin_port);
    } else if (name->ss_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)name;
        if (inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host) == NULL) return PyErr_SetFromErrno(PyExc_OSError);
        port = ntohs(a->sin6_port);
    } else {
        Py_RETURN_NONE; /* not an IP source (cannot happen on a UDP socket): the device drops it as no endpoint */
    }
    PyObject *t = Py_BuildValue("(sI)", host, port);
    if (t == NULL) return NULL;
    Py_XDECREF(last_addr);
    Py_INCREF(t);
    last_addr = t;
    memcpy(&last_name, name, (size_t)len);
    last_namelen = len;
    return t;
}

/* udp_recv(fd, bufs, sizes, addrs, limit, gro) -> (n, coalesced, truncated, transient, errno)
 *
 * One recvmmsg(2) (MSG_DONTWAIT) of up to `limit` datagrams into bufs[0..limit-1] (writable buffers). Datagram i
 * of the result is bufs[i][:sizes[i]] from addrs[i] (sizes and addrs are lists of at least `limit` entries, set in
 * place); n says how many. A datagram the kernel cut to its buffer (MSG_TRUNC) is not kept (`truncated` counts
 * its datagrams: a cut GRO read, ceil(length / segment size); a kept one after it is moved down into the free
 * buffer). With `gro`, a read the kernel coalesced (a UDP_GRO cmsg with
 * a segment size below its length) is listed in `coalesced` as (i, segment size) for the caller to split; None
 * when there is none. An ICMP error queued on the socket (server unreachable) fails a receive before any datagram:
 * it is counted in `transient` and the receive retried (at most `limit` times); any other errno but EAGAIN stops
 * and is returned. */
static PyObject *udp_recv(PyObject *mod, PyObject *args) {
    int fd, gro;
    PyObject *bufs_in, *sizes, *addrs;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "iO!O!O!np:udp_recv", &fd, &PyList_Type, &bufs_in, &PyList_Type, &sizes,
                          &PyList_Type, &addrs, &limit, &gro))
        return NULL;
    if (limit < 1 || limit > UDP_RECV_MAX || PyList_GET_SIZE(bufs_in) < limit || PyList_GET_SIZE(sizes) < limit ||
        PyList_GET_SIZE(addrs) < limit) {
        PyErr_SetString(PyExc_ValueError, "udp_recv: limit 1..256, and bufs, sizes and addrs of at least limit");
        return NULL;
    }
    static struct mmsghdr msgs[UDP_RECV_MAX];
    static struct iovec iov[UDP_RECV_MAX];
    static struct sockaddr_storage names[UDP_RECV_MAX];
    static union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctrl[UDP_RECV_MAX];
    Py_buffer views[UDP_RECV_MAX];
    PyObject *bufs = PyList_GetSlice(bufs_in, 0, limit); /* a buffer export cannot change what we hold */
    if (bufs == NULL) return NULL;
    Py_ssize_t got = 0, kept = 0, truncated = 0, transient = 0;
    PyObject *res = NULL, *coalesced = NULL;
    int err = 0;
    for (; got < limit; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(bufs, got), &views[got], PyBUF_WRITABLE) < 0) goto done;
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
        memset(&msgs[got], 0, sizeof msgs[got]);
        msgs[got].msg_hdr.msg_name = &names[got];
        msgs[got].msg_hdr.msg_namelen = sizeof names[got];
        msgs[got].msg_hdr.msg_iov = &iov[got];
        msgs[got].msg_hdr.msg_iovlen = 1;
        if (gro) {
            msgs[got].msg_hdr.msg_control = ctrl[got].buf;
            msgs[got].msg_hdr.msg_controllen = sizeof ctrl[got].buf;
        }
    }
    int r;
    for (;;) {
        r = recvmmsg(fd, msgs, (unsigned)limit, MSG_DONTWAIT | MSG_TRUNC, NULL);
        if (r >= 0) break;
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0) goto done;
            continue;
        }
        if (is_transient_recv(errno) && transient < limit) {
            transient++;
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
        r = 0;
        break;
    }
    for (int j = 0; j < r; j++) {
        struct msghdr *h = &msgs[j].msg_hdr;
        size_t len = msgs[j].msg_len;
        int seg = 0;
        if (gro) {
            for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
                if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int)))
                    memcpy(&seg, CMSG_DATA(c), sizeof seg);
            }
        }
        if (h->msg_flags & MSG_TRUNC) { /* MSG_TRUNC asked: len is the full length, so count its datagrams */
            truncated += seg > 0 ? (Py_ssize_t)((len + (size_t)seg - 1) / (size_t)seg) : 1;
            continue;
        }
        if (kept != j) { /* a truncated datagram before this one: its buffer is free, move this one down */
            if ((size_t)views[kept].len < len) {
                truncated++;
                continue;
            }
            memmove(views[kept].buf, views[j].buf, len);
        }
        if (gro) {
            if (seg != 0 && (seg < 0 || (size_t)seg < len)) { /* the caller checks the size and splits */
                if (coalesced == NULL && (coalesced = PyList_New(0)) == NULL) goto done;
                PyObject *item = Py_BuildValue("(ni)", kept, seg);
                if (item == NULL || PyList_Append(coalesced, item) < 0) {
                    Py_XDECREF(item);
                    goto done;
                }
                Py_DECREF(item);
            }
        }
        PyObject *size = PyLong_FromSize_t(len);
        if (size == NULL) goto done;
        PyObject *addr = source_tuple(&names[j], h->msg_namelen);
        if (addr == NULL) {
            Py_DECREF(size);
            goto done;
        }
        if (PyList_SetItem(sizes, kept, size) < 0 || PyList_SetItem(addrs, kept, addr) < 0) goto done; /* steal */
        kept++;
    }
    res = Py_BuildValue("(nOnni)", kept, coalesced != NULL ? coalesced : Py_None, truncated, transient, err);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    Py_XDECREF(coalesced);
    Py_DECREF(bufs);
    return res;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"seal_batch", seal_batch, METH_VARARGS,
     "seal_batch(aead, remote_index, counter, mtu, packets, out_bufs, indices) -> next counter."},
    {"open_batch", open_batch, METH_VARARGS, "open_batch(datagrams, keys) -> [bytes | False | None, ...]."},
    {"fold16", fold16, METH_VARARGS, "fold16(data, skip=-1) -> the folded RFC 1071 sum, 0..0xFFFF."},
    {"tun_read", tun_read, METH_VARARGS, "tun_read(fd, limit, size, hdr4, hdr6) -> (packets, empty, truncated, nbytes, errno)."},
    {"tun_write", tun_write, METH_VARARGS,
     "tun_write(fd, packets, offset, hdr4, hdr6, mtu, check) -> (accepted, nbytes, drops, errno)."},
    {"udp_recv", udp_recv, METH_VARARGS,
     "udp_recv(fd, bufs, sizes, addrs, limit, gro) -> (n, coalesced, truncated, transient, errno)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_accel", "netsim's optional native accelerator (docs/native.md).", -1, methods,
};

PyMODINIT_FUNC PyInit__accel(void) {
    if (PyType_Ready(&AeadType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&AeadType);
    if (PyModule_AddObject(m, "Aead", (PyObject *)&AeadType) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
