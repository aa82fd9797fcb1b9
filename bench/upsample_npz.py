"""Writes a MedMNIST-style npz whose images are an official file's, upsampled k times by
pixel repetition (standard library only): a large input of known content for memory
benchmarks, e.g. pneumoniamnist.npz -> pneumoniamnist_224.npz with k = 8.

    python3 bench/upsample_npz.py ../shared/data/medmnist/pneumoniamnist.npz 8 /tmp/big/pneumoniamnist_224.npz

With --masks it writes a MedSegBench-style segmentation npz instead: per split the images and
`<split>_masks` (1 where a pixel is above 127) in place of the class labels.

    python3 bench/upsample_npz.py ../shared/data/medmnist/pneumoniamnist.npz 8 /tmp/big/pneumonia_seg_224.npz --masks
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


def main(src, k, dst, masks=False):
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name in z.namelist():
            b = z.read(name)
            if "images" not in name:
                if not masks:
                    out.writestr(name, b)
                continue
            h, data = parse_npy(b)
            assert h["descr"] == "|u1" and len(h["shape"]) == 3, "grey uint8 images expected"
            n, rows, cols = h["shape"]
            big = bytearray()
            for y in range(n * rows):
                line = data[y * cols:(y + 1) * cols]
                big += bytes(v for v in line for _ in range(k)) * k
            shape = (n, rows * k, cols * k)
            out.writestr(name, npy(h["descr"], shape, bytes(big)))
            if masks:
                fg = bytes(v > 127 for v in big)
                out.writestr(name.replace("images", "masks"), npy(h["descr"], shape, fg))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["--masks"])
