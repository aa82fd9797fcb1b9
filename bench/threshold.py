"""Decision thresholds of BreastMNIST fine-tunes (BENCHMARKS.md, "A class-balanced loss").

Reads DIR/sS-val.csv and DIR/sS-test.csv (`omnirad predict --split val|test` of the bundle of seed
S) and the official npz's labels. Per seed: test ACC at p(malignant) >= 0.5 (argmax); the
threshold that maximises val ACC over the midpoints between sorted val scores (and 0.5), ties to
the one closest to 0.5, and its test ACC; and test ACC at fixed thresholds, for reading only.
Plain Python (no numpy), so it runs wherever the npz is.

    python3 bench/threshold.py [DIR] [NPZ] [SEEDS]
"""
import ast
import csv
import sys
import zipfile


def npy_u8(zf, name):
    """A uint8 .npy member of an npz (format 1.0, as the MedMNIST files are), flattened."""
    b = zf.read(name)
    assert b[:6] == b'\x93NUMPY' and b[6] == 1, f'{name}: not a version-1 .npy'
    hl = int.from_bytes(b[8:10], 'little')
    h = ast.literal_eval(b[10:10 + hl].decode())
    assert h['descr'] == '|u1', h
    return list(b[10 + hl:])


def probs(path):
    """p_0 (malignant) per row of an `omnirad predict` CSV (id,p_0,p_1,predicted)."""
    return [float(r[1]) for r in list(csv.reader(open(path)))[1:]]


def acc(p0, y, t):
    """ACC with "malignant iff p_0 >= t", malignant found, benign called malignant."""
    pred = [0 if p >= t else 1 for p in p0]
    ok = sum(a == b for a, b in zip(pred, y))
    return (ok / len(y), sum(a == 0 and b == 0 for a, b in zip(pred, y)),
            sum(a == 0 and b == 1 for a, b in zip(pred, y)))


DIR = sys.argv[1] if len(sys.argv) > 1 else 'runs/thr'
NPZ = sys.argv[2] if len(sys.argv) > 2 else '../shared/data/medmnist/breastmnist.npz'
SEEDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
zf = zipfile.ZipFile(NPZ)
lab = {s: npy_u8(zf, f'{s}_labels.npy') for s in ('val', 'test')}
for s in range(SEEDS):
    pv, pt = probs(f'{DIR}/s{s}-val.csv'), probs(f'{DIR}/s{s}-test.csv')
    assert len(pv) == len(lab['val']) and len(pt) == len(lab['test'])
    u = sorted(set(pv))
    cands = [0.5] + [(a + b) / 2 for a, b in zip(u, u[1:])]
    best = max(cands, key=lambda t: (acc(pv, lab['val'], t)[0], -abs(t - 0.5)))
    a05, at = acc(pt, lab['test'], 0.5), acc(pt, lab['test'], best)
    curve = ' '.join(f'{t}:{acc(pt, lab["test"], t)[0]:.3f}' for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    print(f'seed {s}: test ACC at 0.5 {a05[0]:.3f} (malignant found {a05[1]}, benign called malignant {a05[2]}); '
          f'val-chosen t {best:.3f} (val ACC {acc(pv, lab["val"], best)[0]:.3f} vs {acc(pv, lab["val"], 0.5)[0]:.3f} at 0.5) '
          f'-> test ACC {at[0]:.3f} ({at[1]}, {at[2]}); test ACC by t {curve}')
