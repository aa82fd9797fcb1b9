"""Writes a synthetic CT-sized NIfTI volume (512 x 512 x 200, int16, gzip; standard library
only): air (-1000) outside a 200-voxel-radius cylinder, a deterministic 40..239 pattern inside.
A large volume of known content for decode benchmarks; shared/data's volumes are small.

    python3 bench/synthetic_ct_nifti.py /tmp/vol/ct.nii.gz [SLICES]   # SLICES: 200 unless given
"""
import array
import gzip
import struct
import sys

NX, NY, NZ = 512, 512, 200


def header(nz):
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, 3, NX, NY, nz, 1, 1, 1, 1)
    struct.pack_into("<hh", h, 70, 4, 16)  # int16
    struct.pack_into("<8f", h, 76, 1, 0.7, 0.7, 1.5, 1, 1, 1, 1)
    struct.pack_into("<fff", h, 108, 352, 1, 0)  # vox_offset, scl_slope, scl_inter
    struct.pack_into("<h", h, 254, 1)  # sform_code
    struct.pack_into("<4f", h, 280, 0.7, 0, 0, 0)
    struct.pack_into("<4f", h, 296, 0, 0.7, 0, 0)
    struct.pack_into("<4f", h, 312, 0, 0, 1.5, 0)
    h[344:348] = b"n+1\0"
    return bytes(h) + b"\0" * 4


def main(out, nz):
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(header(nz))
        for z in range(nz):
            s = array.array("h", [0]) * (NX * NY)
            for y in range(NY):
                for x in range(NX):
                    dx, dy = x - 256, y - 256
                    inside = dx * dx + dy * dy <= 200 * 200
                    s[y * NX + x] = 40 + (x * 7 + y * 13 + z * 3) % 200 if inside else -1000
            f.write(s.tobytes())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else NZ)
