"""Writes a MedMNIST-style npz whose images are an official file's, upsampled k times by
pixel repetition (standard library only): a large input of known content for memory
benchmarks, e.g. pneumoniamnist.npz -> pneumoniamnist_224.npz with k = 8.

    python3 bench/upsample_npz.py ../shared/data/medmnist/pneumoniamnist.npz 8 /tmp/big/pneumoniamnist_224.npz
"""
import ast
import struct
import sys
import zipfile


def parse_npy(b):
    assert b[:6] == b"\x93NUMPY", "not an npy array"
    if b[6] == 1:
        n, off = struct.unpack("<H", b[8:10])[0], 10
    else:
        n, off = struct.unpack("<I", b[8:12])[0], 12
    return ast.literal_eval(b[off:off + n].decode("latin1")), b[off + n:]


def npy(descr, shape, data):
    h = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))
    h += " " * (64 - (10 + len(h) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode("latin1") + data


def main(src, k, dst):
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name in z.namelist():
            b = z.read(name)
            if "images" not in name:
                out.writestr(name, b)
                continue
            h, data = parse_npy(b)
            assert h["descr"] == "|u1" and len(h["shape"]) == 3, "grey uint8 images expected"
            n, rows, cols = h["shape"]
            big = bytearray()
            for y in range(n * rows):
                line = data[y * cols:(y + 1) * cols]
                big += bytes(v for v in line for _ in range(k)) * k
            out.writestr(name, npy(h["descr"], (n, rows * k, cols * k), bytes(big)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
