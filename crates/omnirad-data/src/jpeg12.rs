//! Sequential Huffman DCT JPEG (ITU-T T.81 baseline and extended, SOF0/SOF1) for one grey
//! component at 8 or 12 bits: DICOM's JPEG Extended (1.2.840.10008.1.2.4.51) 12-bit CT/MR.
//!
//! Written here because no pure-Rust JPEG decoder reads 12-bit samples (jpeg-decoder and
//! zune-jpeg stop at 8; libjpeg needs a C build). dicom-rs keeps decoding every other JPEG;
//! this one is asked only when a grey frame has more than 8 bits stored. Progressive,
//! lossless, arithmetic-coded and multi-component streams are errors naming what they are.

/// Natural-order index of the k-th coefficient in zig-zag order (T.81 figure A.6).
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

type Result<T> = std::result::Result<T, String>;

/// Canonical Huffman table in T.81 F.2.2.3's form: for each code length, the largest code,
/// and the offset of that length's first value.
struct Huffman {
    max_code: [i32; 17],
    val_offset: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self> {
        let mut max_code = [-1i32; 17];
        let mut val_offset = [0i32; 17];
        let (mut code, mut k) = (0i32, 0i32);
        for len in 1..=16 {
            let n = counts[len - 1] as i32;
            if n > 0 {
                val_offset[len] = k - code;
                code += n;
                k += n;
                max_code[len] = code - 1;
            }
            if code > 1 << len {
                return Err("Huffman table with more codes than its lengths allow".into());
            }
            code <<= 1;
        }
        Ok(Self {
            max_code,
            val_offset,
            values,
        })
    }

    fn decode(&self, bits: &mut BitReader) -> Result<u8> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | bits.bit()? as i32;
            if code <= self.max_code[len] {
                return self
                    .values
                    .get((code + self.val_offset[len]) as usize)
                    .copied()
                    .ok_or_else(|| "Huffman code past its table".into());
            }
        }
        Err("invalid Huffman code".into())
    }
}

/// Entropy-coded bits, with 0xFF00 stuffing removed; a marker ends them, and reading on past
/// it is an error (a block cut short).
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u32,
    n: u32,
    marker: Option<u8>,
}

impl<'a> BitReader<'a> {
    fn bit(&mut self) -> Result<u32> {
        if self.n == 0 {
            self.acc = self.byte()? as u32;
            self.n = 8;
        }
        self.n -= 1;
        Ok((self.acc >> self.n) & 1)
    }

    fn byte(&mut self) -> Result<u8> {
        if self.marker.is_some() {
            return Err("entropy-coded data ended early (a marker inside a block)".into());
        }
        let b = *self
            .data
            .get(self.pos)
            .ok_or("truncated entropy-coded data")?;
        if b == 0xff {
            let next = *self
                .data
                .get(self.pos + 1)
                .ok_or("truncated entropy-coded data")?;
            if next == 0 {
                self.pos += 2;
                return Ok(0xff);
            }
            self.marker = Some(next);
            return Err("entropy-coded data ended early (a marker inside a block)".into());
        }
        self.pos += 1;
        Ok(b)
    }

    fn bits(&mut self, count: u32) -> Result<i32> {
        let mut v = 0i32;
        for _ in 0..count {
            v = (v << 1) | self.bit()? as i32;
        }
        Ok(v)
    }

    /// T.81 F.2.2.1's RECEIVE and EXTEND: `size` bits as a signed magnitude.
    fn signed(&mut self, size: u8) -> Result<i32> {
        if size == 0 {
            return Ok(0);
        }
        if size > 16 {
            return Err(format!("coefficient size {size} above 16 bits"));
        }
        let v = self.bits(size as u32)?;
        Ok(if v < 1 << (size - 1) {
            v - (1 << size) + 1
        } else {
            v
        })
    }

    /// Skips to the restart marker RSTn that `expect` names (T.81 F.2.1.3).
    fn restart(&mut self, expect: u8) -> Result<()> {
        self.n = 0;
        let found = match self.marker.take() {
            Some(m) => m,
            None => {
                // The scan's bits ended on a byte boundary; the marker is next.
                if self.data.get(self.pos) != Some(&0xff) {
                    return Err("restart marker missing".into());
                }
                *self
                    .data
                    .get(self.pos + 1)
                    .ok_or("truncated before a restart")?
            }
        };
        if found != 0xd0 + expect {
            return Err(format!(
                "restart marker RST{} where RST{expect} was due",
                found.wrapping_sub(0xd0)
            ));
        }
        self.pos += 2;
        Ok(())
    }
}

/// One 8-point inverse DCT of libjpeg's "islow" method (Loeffler–Ligtenberg–Moschytz with
/// 13-bit fixed-point constants, the IJG's default that DCMTK, GDCM and pydicom's decoders
/// use), before its final descaling: outputs are scaled by 2^13 and by √8.
fn idct_1d(i: [i64; 8]) -> [i64; 8] {
    const F0_298: i64 = 2446; // round(x · 2^13) of the constant its name gives
    const F0_390: i64 = 3196;
    const F0_541: i64 = 4433;
    const F0_765: i64 = 6270;
    const F0_899: i64 = 7373;
    const F1_175: i64 = 9633;
    const F1_501: i64 = 12299;
    const F1_847: i64 = 15137;
    const F1_961: i64 = 16069;
    const F2_053: i64 = 16819;
    const F2_562: i64 = 20995;
    const F3_072: i64 = 25172;
    // Even part.
    let z1 = (i[2] + i[6]) * F0_541;
    let t2 = z1 - i[6] * F1_847;
    let t3 = z1 + i[2] * F0_765;
    let t0 = (i[0] + i[4]) << 13;
    let t1 = (i[0] - i[4]) << 13;
    let (t10, t13, t11, t12) = (t0 + t3, t0 - t3, t1 + t2, t1 - t2);
    // Odd part.
    let (o0, o1, o2, o3) = (i[7], i[5], i[3], i[1]);
    let z5 = (o0 + o3 + o1 + o2) * F1_175;
    let z1 = -(o0 + o3) * F0_899;
    let z2 = -(o1 + o2) * F2_562;
    let z3 = -(o0 + o2) * F1_961 + z5;
    let z4 = -(o1 + o3) * F0_390 + z5;
    let o0 = o0 * F0_298 + z1 + z3;
    let o1 = o1 * F2_053 + z2 + z4;
    let o2 = o2 * F3_072 + z2 + z3;
    let o3 = o3 * F1_501 + z1 + z4;
    [
        t10 + o3,
        t11 + o2,
        t12 + o1,
        t13 + o0,
        t13 - o0,
        t12 - o1,
        t11 - o2,
        t10 - o3,
    ]
}

/// libjpeg's DESCALE: `x / 2^n` rounded half up.
fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// A block's samples from its dequantised coefficients (natural order), as libjpeg's islow
/// computes them: columns first, then rows, clamped to the sample range.
fn inverse_dct(coef: &[i64; 64], precision: u8) -> [u16; 64] {
    // libjpeg keeps 2 extra bits between the passes at 8-bit precision, 1 at 12.
    let pass1: u32 = if precision == 8 { 2 } else { 1 };
    let mut ws = [0i64; 64];
    for c in 0..8 {
        let col = idct_1d(std::array::from_fn(|r| coef[r * 8 + c]));
        for r in 0..8 {
            ws[r * 8 + c] = descale(col[r], 13 - pass1);
        }
    }
    let (center, max) = (1i64 << (precision - 1), (1i64 << precision) - 1);
    let mut out = [0u16; 64];
    for r in 0..8 {
        let row = idct_1d(std::array::from_fn(|c| ws[r * 8 + c]));
        for c in 0..8 {
            out[r * 8 + c] = (descale(row[c], 13 + pass1 + 3) + center).clamp(0, max) as u16;
        }
    }
    out
}

fn u16_at(data: &[u8], at: usize) -> Result<usize> {
    match data.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]]) as usize),
        None => Err("truncated JPEG header".into()),
    }
}

/// Decodes one grey sequential-DCT JPEG stream (SOI … EOI) of `width`×`height` samples into
/// row-major samples in `0 ..= 2^precision - 1` (the size is checked before any allocation: the
/// header is untrusted).
pub(crate) fn decode(data: &[u8], width: usize, height: usize) -> Result<Vec<u16>> {
    if data.get(..2) != Some(&[0xff, 0xd8]) {
        return Err("no JPEG start-of-image marker".into());
    }
    let mut quant: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac: [Option<Huffman>; 4] = [None, None, None, None];
    let mut frame: Option<(u8, usize)> = None; // precision, quantisation table
    let mut restart_interval = 0usize;
    let mut pos = 2;
    loop {
        // Fill bytes (0xFF runs) may precede a marker.
        while data.get(pos) == Some(&0xff) && data.get(pos + 1) == Some(&0xff) {
            pos += 1;
        }
        if data.get(pos) != Some(&0xff) {
            return Err(format!("expected a JPEG marker at byte {pos}"));
        }
        let marker = *data.get(pos + 1).ok_or("truncated JPEG header")?;
        pos += 2;
        if marker == 0xd9 {
            return Err("no scan before the end-of-image marker".into());
        }
        let len = u16_at(data, pos)?;
        let seg = data
            .get(pos + 2..pos + len)
            .filter(|_| len >= 2)
            .ok_or_else(|| format!("JPEG segment 0xFF{marker:02X} runs past the data"))?;
        match marker {
            0xdb => {
                let mut s = seg;
                while !s.is_empty() {
                    let (pq, tq) = (s[0] >> 4, (s[0] & 15) as usize);
                    let size = if pq == 0 { 64 } else { 128 };
                    let body = s.get(1..1 + size).ok_or("truncated quantisation table")?;
                    if tq > 3 || pq > 1 {
                        return Err(format!("quantisation table {tq} of precision {pq}"));
                    }
                    let mut q = [0u16; 64];
                    for (k, v) in q.iter_mut().enumerate() {
                        *v = if pq == 0 {
                            body[k] as u16
                        } else {
                            u16::from_be_bytes([body[2 * k], body[2 * k + 1]])
                        };
                    }
                    quant[tq] = Some(q);
                    s = &s[1 + size..];
                }
            }
            0xc4 => {
                let mut s = seg;
                while !s.is_empty() {
                    let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
                    let counts: [u8; 16] = s
                        .get(1..17)
                        .ok_or("truncated Huffman table")?
                        .try_into()
                        .expect("16 bytes");
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    let values = s.get(17..17 + n).ok_or("truncated Huffman table")?.to_vec();
                    if class > 1 || id > 3 {
                        return Err(format!("Huffman table class {class} id {id}"));
                    }
                    let table = Some(Huffman::new(&counts, values)?);
                    if class == 0 {
                        dc[id] = table;
                    } else {
                        ac[id] = table;
                    }
                    s = &s[17 + n..];
                }
            }
            0xc0 | 0xc1 => {
                if seg.len() < 6 {
                    return Err("truncated frame header".into());
                }
                let precision = seg[0];
                let h = u16_at(seg, 1)?;
                let w = u16_at(seg, 3)?;
                let components = seg[5];
                if components != 1 {
                    return Err(format!(
                        "{components} components: only grey (one-component) 12-bit JPEG is decoded"
                    ));
                }
                if precision != 8 && precision != 12 {
                    return Err(format!("sample precision {precision} (8 or 12 expected)"));
                }
                if (w, h) != (width, height) {
                    return Err(format!("{w}x{h} samples, the file says {width}x{height}"));
                }
                let table = *seg.get(8).ok_or("truncated frame header")? as usize;
                frame = Some((precision, table));
            }
            0xc2 | 0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf => {
                let kind = match marker {
                    0xc2 | 0xc6 | 0xca | 0xce => "progressive",
                    0xc3 | 0xc7 | 0xcb | 0xcf => "lossless",
                    _ => "hierarchical or arithmetic-coded",
                };
                return Err(format!("{kind} JPEG (SOF 0xFF{marker:02X}) is not decoded"));
            }
            0xdd => restart_interval = u16_at(seg, 0)?,
            0xda => {
                let (precision, table) = frame.ok_or("scan before the frame header")?;
                let (td, ta) = match seg {
                    [1, _, t, ..] => ((t >> 4) as usize, (t & 15) as usize),
                    _ => return Err("scan header for other than one component".into()),
                };
                let q = quant
                    .get(table)
                    .copied()
                    .flatten()
                    .ok_or(format!("quantisation table {table} not defined"))?;
                let dc = dc
                    .get(td)
                    .and_then(Option::as_ref)
                    .ok_or("DC Huffman table not defined")?;
                let ac = ac
                    .get(ta)
                    .and_then(Option::as_ref)
                    .ok_or("AC Huffman table not defined")?;
                let scan = &data[pos + len..];
                return decode_scan(scan, &q, dc, ac, precision, height, width, restart_interval);
            }
            _ => {} // APPn, COM and others carry nothing the samples need
        }
        pos += len;
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_scan(
    scan: &[u8],
    q: &[u16; 64],
    dc: &Huffman,
    ac: &Huffman,
    precision: u8,
    height: usize,
    width: usize,
    restart_interval: usize,
) -> Result<Vec<u16>> {
    let (bw, bh) = (width.div_ceil(8), height.div_ceil(8));
    let stride = bw * 8;
    let mut plane = vec![0u16; stride * bh * 8];
    let mut bits = BitReader {
        data: scan,
        pos: 0,
        acc: 0,
        n: 0,
        marker: None,
    };
    let mut pred = 0i32;
    let mut rst = 0u8;
    for b in 0..bw * bh {
        if restart_interval > 0 && b > 0 && b % restart_interval == 0 {
            bits.restart(rst)?;
            rst = (rst + 1) % 8;
            pred = 0;
        }
        let mut coef = [0i64; 64];
        let t = dc.decode(&mut bits)?;
        pred = pred
            .checked_add(bits.signed(t)?)
            .ok_or("DC coefficient out of range")?;
        coef[0] = pred as i64 * q[0] as i64;
        let mut k = 1;
        while k < 64 {
            let rs = ac.decode(&mut bits)?;
            let (run, size) = ((rs >> 4) as usize, rs & 15);
            if size == 0 {
                if run != 15 {
                    break; // end of block
                }
                k += 16;
                continue;
            }
            k += run;
            if k > 63 {
                return Err("AC coefficients run past the block".into());
            }
            coef[ZIGZAG[k]] = bits.signed(size)? as i64 * q[k] as i64;
            k += 1;
        }
        let block = inverse_dct(&coef, precision);
        let (by, bx) = (b / bw, b % bw);
        for y in 0..8 {
            let at = (by * 8 + y) * stride + bx * 8;
            plane[at..at + 8].copy_from_slice(&block[y * 8..y * 8 + 8]);
        }
    }
    // The scan ends at the end-of-image marker; a stream cut there was cut short.
    let mut at = bits.pos;
    while scan.get(at) == Some(&0xff) && scan.get(at + 1) == Some(&0xff) {
        at += 1;
    }
    if scan.get(at..at + 2) != Some(&[0xff, 0xd9]) {
        return Err("no end-of-image marker after the scan (truncated data?)".into());
    }
    Ok((0..height)
        .flat_map(|y| plane[y * stride..y * stride + width].iter().copied())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BUSI ultrasound image (grey, 256²) cut to `w`×`h`, so blocks overhang both edges.
    fn busi(w: u32, h: u32) -> Vec<u8> {
        let root = std::env::var_os("OMNIRAD_DATA")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
            });
        let img = image::open(root.join("busi-256/benign/benign (1).png"))
            .expect("BUSI image (set OMNIRAD_DATA to shared/data)")
            .to_luma8();
        image::imageops::crop_imm(&img, 0, 0, w, h)
            .to_image()
            .into_raw()
    }

    fn encode(
        pixels: &[u8],
        w: u16,
        h: u16,
        setup: impl Fn(&mut jpeg_encoder::Encoder<&mut Vec<u8>>),
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
        setup(&mut enc);
        enc.encode(pixels, w, h, jpeg_encoder::ColorType::Luma)
            .unwrap();
        out
    }

    #[test]
    fn eight_bit_streams_decode_as_jpeg_decoder_does() {
        // The same decoder reads 12-bit data; at 8 bits an independent one can check it.
        let (w, h) = (253u16, 250u16);
        let pixels = busi(w as u32, h as u32);
        for (name, restart, optimized) in [
            ("standard tables", 0, false),
            ("optimised tables, restart every 7 blocks", 7, true),
        ] {
            let stream = encode(&pixels, w, h, |e| {
                if restart > 0 {
                    e.set_restart_interval(restart);
                }
                e.set_optimized_huffman_tables(optimized);
            });
            let ours = decode(&stream, w as usize, h as usize).unwrap();
            let theirs = jpeg_decoder::Decoder::new(&stream[..]).decode().unwrap();
            assert_eq!(ours.len(), theirs.len(), "{name}");
            let diff: Vec<i32> = ours
                .iter()
                .zip(&theirs)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .collect();
            let max = *diff.iter().max().unwrap();
            let off = diff.iter().filter(|&&d| d > 0).count() as f64 / diff.len() as f64;
            // jpeg-decoder's inverse DCT (stb_image's) and libjpeg's islow round one level apart.
            assert!(
                max <= 1 && off < 0.05,
                "{name}: max diff {max}, {off:.3} differ"
            );
            // And the image is the encoded one, up to JPEG's loss at quality 90.
            let mean = ours
                .iter()
                .zip(&pixels)
                .map(|(&a, &b)| (a as f64 - b as f64).abs())
                .sum::<f64>()
                / pixels.len() as f64;
            assert!(mean < 3.0, "{name}: mean error {mean} against the source");
        }
    }

    #[test]
    fn unsupported_and_damaged_streams_are_errors() {
        let (w, h) = (64u16, 48u16);
        let pixels = busi(w as u32, h as u32);
        let progressive = encode(&pixels, w, h, |e| e.set_progressive(true));
        assert!(decode(&progressive, 64, 48)
            .unwrap_err()
            .contains("progressive"));
        let colour = {
            let rgb: Vec<u8> = pixels.iter().flat_map(|&v| [v, v, v]).collect();
            let mut out = Vec::new();
            jpeg_encoder::Encoder::new(&mut out, 90)
                .encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb)
                .unwrap();
            out
        };
        assert!(decode(&colour, 64, 48)
            .unwrap_err()
            .contains("3 components"));
        let stream = encode(&pixels, w, h, |e| e.set_restart_interval(4));
        let err = decode(&stream, 64, 40).unwrap_err();
        assert!(err.contains("64x48 samples, the file says 64x40"), "{err}");
        for cut in [2, 20, stream.len() / 2, stream.len() - 2] {
            assert!(decode(&stream[..cut], 64, 48).is_err(), "cut at {cut}");
        }
        // Every single-byte change: an error or an image of the declared size, never a panic.
        for at in (2..stream.len()).step_by(3) {
            let mut s = stream.clone();
            s[at] ^= 0x5a;
            if let Ok(f) = decode(&s, 64, 48) {
                assert_eq!(f.len(), 64 * 48);
            }
        }
    }
}
