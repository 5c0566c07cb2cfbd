//! Loss curves as a PNG, with no plotting or font dependency: lines, dots, axes and numeric tick
//! labels (a 3 × 5 digit font) drawn into an RGB buffer, encoded with `flate2` + `crc32fast`.
//! The legend and axis names live in the model card's caption.

use std::io::Write;

/// RGB colour.
pub type Rgb = [u8; 3];

/// One curve: points (x, y), colour, drawn as a line or as dots.
pub struct Series<'a> {
    pub points: &'a [(f64, f64)],
    pub color: Rgb,
    pub dots: bool,
}

/// 3 × 5 glyphs for `0-9 . -` (rows top to bottom, 3 bits each, MSB left).
const GLYPHS: [(char, [u8; 5]); 12] = [
    ('0', [0b111, 0b101, 0b101, 0b101, 0b111]),
    ('1', [0b010, 0b110, 0b010, 0b010, 0b111]),
    ('2', [0b111, 0b001, 0b111, 0b100, 0b111]),
    ('3', [0b111, 0b001, 0b111, 0b001, 0b111]),
    ('4', [0b101, 0b101, 0b111, 0b001, 0b001]),
    ('5', [0b111, 0b100, 0b111, 0b001, 0b111]),
    ('6', [0b111, 0b100, 0b111, 0b101, 0b111]),
    ('7', [0b111, 0b001, 0b010, 0b010, 0b010]),
    ('8', [0b111, 0b101, 0b111, 0b101, 0b111]),
    ('9', [0b111, 0b101, 0b111, 0b001, 0b111]),
    ('.', [0b000, 0b000, 0b000, 0b000, 0b010]),
    ('-', [0b000, 0b000, 0b111, 0b000, 0b000]),
];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            self.set(
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
                c,
            );
        }
    }

    fn text(&mut self, s: &str, x: i64, y: i64, scale: i64, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let Some((_, rows)) = GLYPHS.iter().find(|(g, _)| *g == ch) else {
                continue;
            };
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    x + k as i64 * 4 * scale + col * scale + dx,
                                    y + r as i64 * scale + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn label(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Renders the series on shared axes (y from the data's range) into PNG bytes.
pub fn chart(series: &[Series], width: usize, height: usize) -> Vec<u8> {
    let mut c = Canvas {
        w: width,
        h: height,
        px: vec![255; width * height * 3],
    };
    let all = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    y0 = y0.min(0.0).floor();
    y1 = y1.ceil().max(y0 + 1.0);
    let (left, right, top, bottom) = (60.0, 20.0, 20.0, 40.0);
    let pw = width as f64 - left - right;
    let ph = height as f64 - top - bottom;
    let px = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let grey = [200, 200, 200];
    let black = [0, 0, 0];
    // Grid and ticks: 5 steps on each axis.
    for i in 0..=5 {
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        c.line((left, py(yv)), (left + pw, py(yv)), grey);
        c.text(&label(yv), 4, py(yv) as i64 - 5, 2, black);
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        c.line((px(xv), top), (px(xv), top + ph), grey);
        c.text(
            &label(xv),
            px(xv) as i64 - 10,
            (top + ph) as i64 + 10,
            2,
            black,
        );
    }
    c.line((left, top), (left, top + ph), black);
    c.line((left, top + ph), (left + pw, top + ph), black);
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        if s.dots {
            for &(x, y) in &pts {
                for dy in -2..=2 {
                    for dx in -2..=2 {
                        c.set(x as i64 + dx, y as i64 + dy, s.color);
                    }
                }
            }
        } else {
            for w in pts.windows(2) {
                c.line(w[0], w[1], s.color);
            }
        }
    }
    png(&c)
}

fn png(c: &Canvas) -> Vec<u8> {
    let mut raw = Vec::with_capacity((c.w * 3 + 1) * c.h);
    for row in c.px.chunks(c.w * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("writing to a Vec");
    let idat = z.finish().expect("writing to a Vec");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(c.w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(c.h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &idat);
    chunk(b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_that_decodes_back_to_the_drawing() {
        let pts = [(0.0, 5.0), (10.0, 3.0), (20.0, 2.5)];
        let bytes = chart(
            &[Series {
                points: &pts,
                color: [255, 0, 0],
                dots: false,
            }],
            200,
            120,
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Inflate IDAT and find red pixels: the line was drawn.
        let len = u32::from_be_bytes(bytes[33..37].try_into().unwrap()) as usize;
        assert_eq!(&bytes[37..41], b"IDAT");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::ZlibDecoder::new(&bytes[41..41 + len]),
            &mut raw,
        )
        .unwrap();
        assert_eq!(raw.len(), (200 * 3 + 1) * 120);
        let red: usize = raw
            .chunks(200 * 3 + 1)
            .map(|row| row[1..].chunks(3).filter(|p| p == &[255, 0, 0]).count())
            .sum();
        assert!(red > 100, "{red} red pixels");
    }
}
