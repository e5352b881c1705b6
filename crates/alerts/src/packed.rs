//! A series' kept readings, packed: one to four bytes a reading instead of
//! sixteen, each coming back bit for bit.
//!
//! The engine keeps, per patient and per metric, the readings of its
//! late-reading window (up to `max_points_per_series`, ten minutes of a
//! 1 Hz wearable), for the rules and for NEWS2 (see [`crate::series`]).
//! At sixteen bytes a reading they were most of the alerts service's
//! memory. Kept readings are sorted by instant, one per instant, and most
//! come from devices that measure on a schedule and report what they
//! display: the gap to the next reading is the gap before it, give or take
//! a device's jitter, and a vital sign moves by a few units (72 /min, 97 %,
//! 37.2 °C, 82.35 kg). So they are kept the way TimescaleDB compresses a
//! column, in runs of up to [`CHUNK`] readings:
//! - an instant (microseconds) as the change of the gap from the one
//!   before (delta of delta), a zigzag varint: no byte of its own on a
//!   steady schedule (one bit of the value's varint says the gap did not
//!   change), two or three with milliseconds of jitter;
//! - a value as the change of an integer number of units of the chunk's
//!   scale (1, 0.1, 0.01 or 0.001), a zigzag varint; a chunk takes the
//!   smallest scale that gives back every one of its values exactly
//!   (`k / 10^s` is the very `f64` that was kept, `-0.0` included), and
//!   keeps the eight bytes of each value as they are when none does (more
//!   decimals, an infinity, a NaN with a payload). An artifact (the
//!   canonical NaN) takes one byte and leaves the running value alone.
//!
//! Readings in order are appended to the newest chunk and the oldest are
//! popped from the oldest, each in constant time; a late reading
//! re-encodes its chunk from where it falls (the bytes before it stay), a
//! revised one its whole chunk. Lookups by instant find the chunk by its
//! last instant, then decode within it: a replay decodes every kept
//! reading (about twice the time of reading them unpacked; the README has
//! the figures).

use std::collections::VecDeque;

/// Readings appended to a chunk before the next chunk begins. At a byte a
/// reading a chunk's own state (about 100 bytes) is worth amortizing over
/// many; a lookup decodes within one, a few nanoseconds a reading.
pub(crate) const CHUNK: usize = 256;
/// A chunk that late readings grow past this is split in two.
const SPLIT: usize = CHUNK + CHUNK / 2;
/// The most a reading takes (a change of the gap of ten varint bytes, an
/// escape byte, a value of ten), and so the most a chunk holds: its
/// readings (at most `SPLIT + 1`, while it is split) and as many popped.
const MAX_BYTES: usize = 2 * (SPLIT + 1) * 21;
const _: () = assert!(MAX_BYTES <= u16::MAX as usize);

/// `x` (a count of readings or a position in a chunk's bytes, at most
/// [`MAX_BYTES`]) in sixteen bits.
fn narrow(x: usize) -> u16 {
    u16::try_from(x).unwrap_or(u16::MAX)
}

/// The scale of a chunk that keeps its values' bits as they are.
const RAW: u8 = u8::MAX;
const SCALES: [f64; 4] = [1.0, 10.0, 100.0, 1000.0];

/// The canonical NaN: an artifact (see [`crate::series`]).
fn is_artifact(v: f64) -> bool {
    v.to_bits() == f64::NAN.to_bits()
}

/// `v` as a whole number of units of `SCALES[scale]`, if that number gives
/// back exactly `v` (the same bits, as [`get`] computes it).
fn decimal(v: f64, scale: u8) -> Option<i64> {
    let p = *SCALES.get(usize::from(scale))?;
    let x = v * p;
    // Rounded by a cast, not a libm call; a NaN casts to 0, an infinity
    // saturates, and any wrong guess fails the check below.
    let k = if x < 0.0 {
        (x - 0.5) as i64
    } else {
        (x + 0.5) as i64
    };
    (k.unsigned_abs() <= 1 << 53 && (k as f64 / p).to_bits() == v.to_bits()).then_some(k)
}

/// A value as a chunk keeps it.
#[derive(Debug, Clone, Copy)]
enum Val {
    Artifact,
    /// Units of the chunk's scale.
    Units(i64),
    /// A raw chunk's: the bits.
    Bits(u64),
}

/// `v` as a chunk of `scale` keeps it, if it can.
fn val(v: f64, scale: u8) -> Option<Val> {
    if scale == RAW {
        Some(Val::Bits(v.to_bits()))
    } else if is_artifact(v) {
        Some(Val::Artifact)
    } else {
        decimal(v, scale).map(Val::Units)
    }
}

fn zigzag(x: i64) -> u64 {
    ((x << 1) ^ (x >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

fn write_varint(bytes: &mut Vec<u8>, mut u: u64) {
    while u >= 0x80 {
        bytes.push((u as u8) | 0x80);
        u >>= 7;
    }
    bytes.push(u as u8);
}

/// Reads what [`write_varint`] wrote at `*pos`. The bytes are the chunk's
/// own encoding; past their end it reads zeros rather than panicking.
#[inline]
fn read_varint(bytes: &[u8], pos: &mut usize) -> u64 {
    let mut u = 0u64;
    let mut shift = 0;
    while shift < 64 {
        let b = bytes.get(*pos).copied().unwrap_or(0);
        *pos += 1;
        u |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    u
}

/// The running state of an encoding: the last instant, the last gap, the
/// last value in units of the scale (unused in a raw chunk).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Cursor {
    at: i64,
    dt: i64,
    k: i64,
}

/// Appends the reading at `at` after `c`.
///
/// A raw chunk's reading is the change of the gap (a zigzag varint) and the
/// value's eight bytes. Any other chunk's begins with one varint whose low
/// bit tells whether the gap changed:
/// - `0`: it did not (a device on its schedule), and the rest of the
///   varint is the value: one byte for a change of up to 15 units;
/// - `1`: it did; the rest is the change (zigzag), or, when the varint is
///   exactly 1, the change follows as a varint of its own (a change too
///   large to shift); the value follows as a varint.
///
/// A value is `1` for an artifact, else the change in units, zigzag,
/// shifted left by one.
fn put(bytes: &mut Vec<u8>, c: &mut Cursor, at: i64, v: Val) {
    // Wrapping on both sides: any two instants round-trip.
    let dt = at.wrapping_sub(c.at);
    let change = zigzag(dt.wrapping_sub(c.dt));
    (c.at, c.dt) = (at, dt);
    let value = match v {
        Val::Bits(b) => {
            write_varint(bytes, change);
            bytes.extend_from_slice(&b.to_le_bytes());
            return;
        }
        Val::Artifact => 1,
        Val::Units(k) => {
            // |k| <= 2^53: shifted twice, the zigzag loses nothing.
            let u = zigzag(k.wrapping_sub(c.k)) << 1;
            c.k = k;
            u
        }
    };
    if change == 0 {
        write_varint(bytes, value << 1);
    } else {
        if change < 1 << 63 {
            write_varint(bytes, change << 1 | 1);
        } else {
            write_varint(bytes, 1);
            write_varint(bytes, change);
        }
        write_varint(bytes, value);
    }
}

/// Reads the reading after `c` at `*pos`.
#[inline]
fn get(bytes: &[u8], pos: &mut usize, c: &mut Cursor, scale: u8) -> (i64, f64) {
    if scale == RAW {
        let dt = c.dt.wrapping_add(unzigzag(read_varint(bytes, pos)));
        (c.at, c.dt) = (c.at.wrapping_add(dt), dt);
        let mut b = [0u8; 8];
        if let Some(s) = bytes.get(*pos..*pos + 8) {
            b.copy_from_slice(s);
        }
        *pos += 8;
        return (c.at, f64::from_bits(u64::from_le_bytes(b)));
    }
    let first = read_varint(bytes, pos);
    let value = if first & 1 == 0 {
        first >> 1
    } else {
        let change = match first {
            1 => read_varint(bytes, pos),
            _ => first >> 1,
        };
        c.dt = c.dt.wrapping_add(unzigzag(change));
        read_varint(bytes, pos)
    };
    c.at = c.at.wrapping_add(c.dt);
    if value & 1 == 1 {
        return (c.at, f64::NAN);
    }
    c.k = c.k.wrapping_add(unzigzag(value >> 1));
    let v = match scale {
        // Whole numbers (most vital signs): no division.
        0 => c.k as f64,
        _ => c.k as f64 / SCALES.get(usize::from(scale)).copied().unwrap_or(1.0),
    };
    (c.at, v)
}

/// Up to [`SPLIT`] consecutive readings, encoded.
#[derive(Debug, Clone)]
struct Chunk {
    bytes: Vec<u8>,
    /// Where the first reading kept is encoded (the ones before it were
    /// popped). Sixteen bits are plenty (see [`MAX_BYTES`]) and keep the
    /// chunk, one of several per series, at 88 bytes rather than 104.
    start: u16,
    len: u16,
    scale: u8,
    /// The state before the first reading kept, and after the last.
    head: Cursor,
    tail: Cursor,
    /// The last reading's value.
    last: f64,
}

impl Chunk {
    /// `items` (at least one), encoded after `head`, at scale `hint` if
    /// they all fit it, else at the smallest that keeps them all.
    fn encode(head: Cursor, items: &[(i64, f64)], hint: u8) -> Chunk {
        [hint, 0, 1, 2, 3]
            .into_iter()
            .find_map(|scale| Chunk::encode_at(head, items, scale))
            .or_else(|| Chunk::encode_at(head, items, RAW))
            .unwrap_or_else(|| Chunk::empty(head, RAW))
    }

    /// `items` encoded at `scale`, if they all fit it.
    fn encode_at(head: Cursor, items: &[(i64, f64)], scale: u8) -> Option<Chunk> {
        let mut c = Chunk::empty(head, scale);
        c.bytes.reserve_exact(items.len() * 3);
        for &(at, v) in items {
            put(&mut c.bytes, &mut c.tail, at, val(v, scale)?);
            c.last = v;
        }
        c.len = narrow(items.len());
        c.bytes.shrink_to_fit();
        Some(c)
    }

    fn empty(head: Cursor, scale: u8) -> Chunk {
        Chunk {
            bytes: Vec::new(),
            start: 0,
            len: 0,
            scale,
            head,
            tail: head,
            last: f64::NAN,
        }
    }

    fn reader(&self) -> Reader<'_> {
        Reader {
            bytes: &self.bytes,
            pos: usize::from(self.start),
            cursor: self.head,
            scale: self.scale,
            left: self.len(),
        }
    }

    fn decode(&self) -> Vec<(i64, f64)> {
        self.reader().collect()
    }

    /// Appends (`at`, `v`) if it fits the chunk's scale.
    fn push(&mut self, at: i64, v: f64) -> bool {
        let Some(x) = val(v, self.scale) else {
            return false;
        };
        // Grown by a quarter at a time: the newest chunk of every series
        // is growing, and doubling would leave a third of it unused.
        if self.bytes.capacity() - self.bytes.len() < 20 {
            self.bytes.reserve_exact((self.bytes.len() / 4).max(32));
        }
        put(&mut self.bytes, &mut self.tail, at, x);
        self.len += 1;
        self.last = v;
        true
    }

    fn len(&self) -> usize {
        usize::from(self.len)
    }

    fn pop_front(&mut self) -> Option<(i64, f64)> {
        self.len = self.len.checked_sub(1)?;
        let mut pos = usize::from(self.start);
        let r = get(&self.bytes, &mut pos, &mut self.head, self.scale);
        self.start = narrow(pos);
        Some(r)
    }

    /// Drops the bytes of the readings popped, once they are worth it.
    /// - The oldest chunk of a series at its cap (`sealed`: a newer one
    ///   takes the new readings) loses a reading for every one the newest
    ///   takes: its popped bytes go once they are a quarter of it, and its
    ///   allocation shrinks, or they would be an eighth of the series.
    /// - A chunk that is both the oldest and the newest (a series keeping
    ///   fewer readings than a chunk holds) is appended to and popped from
    ///   for as long as the series lives: its popped bytes go once they are
    ///   half of it, or it would grow forever; its room stays for the
    ///   readings to come.
    fn drop_popped(&mut self, sealed: bool) {
        let start = usize::from(self.start);
        let (least, share) = if sealed { (16, 4) } else { (64, 2) };
        if start >= least && start * share >= self.bytes.len() {
            self.bytes.drain(..start);
            if sealed {
                self.bytes.shrink_to_fit();
            }
            self.start = 0;
        }
    }

    /// The heap bytes it holds.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.bytes.capacity()
    }
}

/// Decodes a chunk's readings in order.
#[derive(Debug, Clone)]
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    cursor: Cursor,
    scale: u8,
    left: usize,
}

impl Iterator for Reader<'_> {
    type Item = (i64, f64);

    fn next(&mut self) -> Option<(i64, f64)> {
        self.left = self.left.checked_sub(1)?;
        Some(get(self.bytes, &mut self.pos, &mut self.cursor, self.scale))
    }
}

/// Readings sorted by instant (microseconds), one per instant, packed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Packed {
    /// Oldest first; none is empty.
    chunks: VecDeque<Chunk>,
    len: usize,
}

impl Packed {
    pub(crate) const fn new() -> Packed {
        Packed {
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The newest reading.
    pub(crate) fn back(&self) -> Option<(i64, f64)> {
        self.chunks.back().map(|c| (c.tail.at, c.last))
    }

    /// The reading at position `i`.
    pub(crate) fn get(&self, i: usize) -> Option<(i64, f64)> {
        self.iter_from(i).next()
    }

    /// The readings, oldest first.
    pub(crate) fn iter(&self) -> Iter<'_> {
        self.iter_from(0)
    }

    /// The readings from position `i` on.
    pub(crate) fn iter_from(&self, i: usize) -> Iter<'_> {
        let (n, j) = self.locate(i);
        let mut chunks = self.chunks.range(n..);
        let reader = chunks.next().map(|c| {
            let mut reader = c.reader();
            if j > 0 {
                reader.nth(j - 1);
            }
            reader
        });
        Iter { chunks, reader }
    }

    /// How many readings are older than `t`.
    pub(crate) fn count_before(&self, t: i64) -> usize {
        match self.back() {
            None => return 0,
            Some((newest, _)) if newest < t => return self.len,
            _ => {}
        }
        if self
            .chunks
            .front()
            .and_then(|c| c.reader().next())
            .is_none_or(|(oldest, _)| oldest >= t)
        {
            return 0;
        }
        // The first chunk whose newest reading is not older than `t`.
        let c = self.chunks.partition_point(|c| c.tail.at < t);
        let before: usize = self.chunks.range(..c).map(Chunk::len).sum();
        let within = self
            .chunks
            .get(c)
            .map_or(0, |c| c.reader().take_while(|r| r.0 < t).count());
        before + within
    }

    /// Where the reading at `t` is (`Ok`), or where it would go (`Err`).
    pub(crate) fn find(&self, t: i64) -> Result<usize, usize> {
        let i = self.count_before(t);
        match self.get(i) {
            Some((at, _)) if at == t => Ok(i),
            _ => Err(i),
        }
    }

    /// The newest reading at or before `t`, and the readings after `t`, in
    /// one pass.
    pub(crate) fn split_at_instant(&self, t: i64) -> (Option<(i64, f64)>, Iter<'_>) {
        // The first chunk with a reading after `t`; the one before ends
        // with the newest reading at or before it, unless this one has a
        // newer.
        let c = self.chunks.partition_point(|c| c.tail.at <= t);
        let mut latest = c
            .checked_sub(1)
            .and_then(|i| self.chunks.get(i))
            .map(|p| (p.tail.at, p.last));
        let mut chunks = self.chunks.range(c..);
        let Some(chunk) = chunks.next() else {
            return (
                latest,
                Iter {
                    chunks,
                    reader: None,
                },
            );
        };
        let mut reader = chunk.reader();
        loop {
            let before = reader.clone();
            match reader.next() {
                Some(r) if r.0 <= t => latest = Some(r),
                Some(_) => {
                    let reader = Some(before);
                    return (latest, Iter { chunks, reader });
                }
                None => {
                    return (
                        latest,
                        Iter {
                            chunks,
                            reader: None,
                        },
                    );
                }
            }
        }
    }

    /// Appends a reading newer than every kept one.
    fn push_back(&mut self, at: i64, v: f64) {
        self.len += 1;
        if let Some(c) = self.chunks.back_mut()
            && c.len() < CHUNK
        {
            if !c.push(at, v) {
                // A value the chunk's scale cannot keep: re-encoded at one
                // that can.
                let mut items = c.decode();
                items.push((at, v));
                *c = Chunk::encode(c.head, &items, c.scale);
            }
            return;
        }
        // A new chunk, continuing from the last one's state, at its scale
        // when the value fits it.
        let (head, scale) = match self.chunks.back_mut() {
            Some(c) => {
                c.bytes.shrink_to_fit();
                (c.tail, c.scale)
            }
            None => (
                Cursor {
                    at,
                    ..Cursor::default()
                },
                0,
            ),
        };
        if self.chunks.len() == self.chunks.capacity() {
            // A series at its cap holds the same number of chunks: no
            // doubling, which would leave room for as many again.
            self.chunks.reserve_exact((self.chunks.len() / 4).max(1));
        }
        self.chunks
            .push_back(Chunk::encode(head, &[(at, v)], scale));
    }

    /// Keeps the reading (`at`, `v`) in its place, unless one at `at` is
    /// kept already (`None`: the first stands); returns its position.
    pub(crate) fn keep(&mut self, at: i64, v: f64) -> Option<usize> {
        match self.back() {
            Some((newest, _)) if newest == at => return None,
            Some((newest, _)) if newest > at => {}
            _ => {
                self.push_back(at, v);
                return Some(self.len - 1);
            }
        }
        // A late reading. The first chunk whose newest is not older: there
        // is one, the newest reading being newer.
        let n = self.chunks.partition_point(|c| c.tail.at < at);
        let before: usize = self.chunks.range(..n).map(Chunk::len).sum();
        let sealed = n + 1 < self.chunks.len();
        let c = self.chunks.get_mut(n)?;
        // The place before the first reading not older than it.
        let mut r = c.reader();
        let mut j = 0;
        let (pos, cursor) = loop {
            let (pos, cursor) = (r.pos, r.cursor);
            match r.next() {
                Some((t, _)) if t < at => j += 1,
                Some((t, _)) if t == at => return None,
                _ => break (pos, cursor),
            }
        };
        let rest = Reader {
            bytes: &c.bytes,
            pos,
            cursor,
            scale: c.scale,
            left: c.len() - j,
        };
        let rest: Vec<(i64, f64)> = std::iter::once((at, v)).chain(rest).collect();
        let vals: Option<Vec<Val>> = rest.iter().map(|r| val(r.1, c.scale)).collect();
        self.len += 1;
        match vals {
            Some(vals) if c.len() < SPLIT => {
                // The readings before it keep their bytes: only those from
                // it on are written again.
                c.bytes.truncate(pos);
                c.tail = cursor;
                for (r, x) in rest.iter().zip(vals) {
                    put(&mut c.bytes, &mut c.tail, r.0, x);
                }
                c.len += 1;
                c.last = rest.last().map_or(v, |r| r.1);
                if sealed {
                    c.bytes.shrink_to_fit();
                }
            }
            _ => {
                let mut items: Vec<(i64, f64)> = c.reader().take(j).collect();
                items.extend(rest);
                if items.len() > SPLIT {
                    let (older, newer) = items.split_at(items.len() / 2);
                    let first = Chunk::encode(c.head, older, c.scale);
                    let second = Chunk::encode(first.tail, newer, c.scale);
                    *c = first;
                    self.chunks.insert(n + 1, second);
                } else {
                    *c = Chunk::encode(c.head, &items, c.scale);
                }
            }
        }
        Some(before + j)
    }

    /// The chunk holding position `i`, and the position in it (past the
    /// last chunk when `i` is past the last reading).
    fn locate(&self, mut i: usize) -> (usize, usize) {
        for (n, c) in self.chunks.iter().enumerate() {
            if i < c.len() {
                return (n, i);
            }
            i -= c.len();
        }
        (self.chunks.len(), i)
    }

    /// Replaces the reading at position `i` (< len) with one at the same
    /// instant.
    pub(crate) fn set(&mut self, i: usize, at: i64, v: f64) {
        if i >= self.len {
            return;
        }
        let (n, j) = self.locate(i);
        let Some(c) = self.chunks.get_mut(n) else {
            return;
        };
        let mut items = c.decode();
        if let Some(r) = items.get_mut(j) {
            *r = (at, v);
        }
        *c = Chunk::encode(c.head, &items, c.scale);
    }

    /// Forgets the `n` oldest readings.
    pub(crate) fn drain_front(&mut self, mut n: usize) {
        while n > 0 {
            let Some(c) = self.chunks.front_mut() else {
                break;
            };
            if n >= c.len() {
                // A whole chunk: nothing to decode.
                n -= c.len();
                self.len -= c.len();
                self.chunks.pop_front();
                continue;
            }
            c.pop_front();
            n -= 1;
            self.len -= 1;
        }
        let sealed = self.chunks.len() > 1;
        if let Some(c) = self.chunks.front_mut() {
            c.drop_popped(sealed);
        }
        // A burst grew the chunk list: give its room back.
        if self.chunks.capacity() > 2 * self.chunks.len() + 2 {
            self.chunks.shrink_to(self.chunks.len() + 1);
        }
    }

    /// The heap bytes it holds (the encodings and the chunk list).
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.chunks.iter().map(Chunk::heap_bytes).sum::<usize>()
    }
}

/// The readings of a [`Packed`], in order.
#[derive(Debug, Clone)]
pub(crate) struct Iter<'a> {
    chunks: std::collections::vec_deque::Iter<'a, Chunk>,
    reader: Option<Reader<'a>>,
}

impl Iterator for Iter<'_> {
    type Item = (i64, f64);

    fn next(&mut self) -> Option<(i64, f64)> {
        loop {
            if let Some(r) = self.reader.as_mut().and_then(Iterator::next) {
                return Some(r);
            }
            self.reader = Some(self.chunks.next()?.reader());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: reproducible draws without a dependency.
    struct Draw(u64);

    impl Draw {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Values of every kind a series can hold.
    fn value(d: &mut Draw) -> f64 {
        match d.below(12) {
            0..=3 => (60 + d.below(40)) as f64,
            4 => (365 + d.below(20)) as f64 / 10.0,
            5 => (8000 + d.below(500)) as f64 / 100.0,
            6 => (d.below(100_000) as f64 / 1000.0) - 50.0,
            7 => f64::NAN,
            8 => f64::from_bits(d.next()),
            9 => [
                -0.0,
                0.0,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::MIN_POSITIVE / 4.0,
            ][d.below(5) as usize],
            10 => 0.1 + 0.2,
            _ => d.below(u64::MAX) as f64 * 1e3,
        }
    }

    fn same(a: &[(i64, f64)], b: &[(i64, f64)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
    }

    fn bits(r: Option<(i64, f64)>) -> Option<(i64, u64)> {
        r.map(|(t, v)| (t, v.to_bits()))
    }

    /// Every operation, on readings of every kind, against a plain sorted
    /// vector: the same readings, bit for bit, the same answers.
    #[test]
    fn packed_readings_are_the_readings_whatever_is_done_to_them() {
        for seed in 0..40 {
            let mut d = Draw(seed);
            let mut packed = Packed::default();
            let mut model: Vec<(i64, f64)> = Vec::new();
            // Around the epoch, today, and near the ends of an i64.
            let mut t = [
                0,
                1_800_000_000_000_000,
                i64::MAX - 1_000_000_000_000,
                i64::MIN + 1,
            ][seed as usize % 4];
            for step in 0..3_000 {
                match d.below(20) {
                    // In order, on a schedule with jitter, or a jump.
                    0..=11 => {
                        t = t.saturating_add(match d.below(10) {
                            0 => 1 + d.below(1 << 40) as i64,
                            1..=4 => 1_000_000,
                            _ => 999_000 + d.below(2_000) as i64,
                        });
                        if model.last().is_some_and(|l| l.0 >= t) {
                            continue;
                        }
                        let v = value(&mut d);
                        assert_eq!(packed.keep(t, v), Some(model.len()));
                        model.push((t, v));
                    }
                    // Late, at an instant not kept yet.
                    12..=14 => {
                        let Some(first) = model.first().map(|f| f.0) else {
                            continue;
                        };
                        let at = first.saturating_sub(10_000_000).saturating_add(
                            (d.below((t.saturating_sub(first) as u64).saturating_add(10_000_000)))
                                as i64,
                        );
                        let i = model.partition_point(|r| r.0 < at);
                        assert_eq!(packed.count_before(at), i, "seed {seed} step {step}");
                        if model.get(i).is_some_and(|r| r.0 == at) {
                            assert_eq!(packed.find(at), Ok(i));
                            assert_eq!(packed.keep(at, 1.0), None, "the first stands");
                            continue;
                        }
                        assert_eq!(packed.find(at), Err(i));
                        let v = value(&mut d);
                        assert_eq!(packed.keep(at, v), Some(i), "seed {seed} step {step}");
                        model.insert(i, (at, v));
                    }
                    15 => {
                        if model.is_empty() {
                            continue;
                        }
                        let i = d.below(model.len() as u64) as usize;
                        let v = value(&mut d);
                        let at = model[i].0;
                        packed.set(i, at, v);
                        model[i].1 = v;
                    }
                    16..=18 => {
                        let n = (d.below(3) as usize).min(model.len());
                        packed.drain_front(n);
                        model.drain(..n);
                    }
                    _ => {
                        let n = d.below(model.len() as u64 + 2) as usize;
                        packed.drain_front(n);
                        model.drain(..n.min(model.len()));
                    }
                }
                assert_eq!(packed.len(), model.len());
                assert_eq!(packed.is_empty(), model.is_empty());
                assert_eq!(bits(packed.back()), bits(model.last().copied()));
                if step % 50 == 0 {
                    let all: Vec<_> = packed.iter().collect();
                    assert!(same(&all, &model), "seed {seed} step {step}");
                    let i = d.below(model.len() as u64 + 1) as usize;
                    let from: Vec<_> = packed.iter_from(i).collect();
                    assert!(same(&from, model.get(i..).unwrap_or(&[])));
                    assert_eq!(bits(packed.get(i)), bits(model.get(i).copied()));
                    for probe in [
                        t,
                        t.wrapping_add(1),
                        model.first().map_or(0, |f| f.0),
                        model.get(i).map_or(0, |r| r.0),
                    ] {
                        assert_eq!(
                            packed.count_before(probe),
                            model.partition_point(|r| r.0 < probe)
                        );
                        let latest = model.iter().rev().find(|r| r.0 <= probe).copied();
                        let (split, after) = packed.split_at_instant(probe);
                        assert_eq!(bits(split), bits(latest));
                        let after: Vec<_> = after.collect();
                        let n = model.partition_point(|r| r.0 <= probe);
                        assert!(same(&after, &model[n..]), "seed {seed} step {step}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_chunk_that_late_readings_fill_is_split() {
        let mut p = Packed::default();
        let mut model = Vec::new();
        for i in 0..CHUNK as i64 {
            p.keep(i * 2, i as f64);
            model.push((i * 2, i as f64));
        }
        // A reading after them all (a new chunk: the first is full), then
        // late readings between every two: the first chunk is split in two
        // halves once it passes SPLIT, and the halves keep taking them.
        for i in (0..CHUNK as i64).rev() {
            let at = i * 2 + 1;
            let n = p.find(at).expect_err("not kept yet");
            assert_eq!(p.keep(at, -(i as f64) - 0.5), Some(n));
            model.insert(n, (at, -(i as f64) - 0.5));
        }
        assert_eq!(p.chunks.len(), 3);
        assert!(p.chunks.iter().all(|c| c.len() <= SPLIT));
        assert!(same(&p.iter().collect::<Vec<_>>(), &model));
        assert_eq!(p.find(2 * CHUNK as i64 - 1), Ok(2 * CHUNK - 1));
    }

    #[test]
    fn every_value_comes_back_bit_for_bit() {
        let values = [
            72.0,
            37.2,
            82.35,
            0.001,
            -0.0,
            0.0,
            -12.5,
            0.1 + 0.2,
            1e300,
            -1e-300,
            f64::MIN_POSITIVE / 8.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::from_bits(f64::NAN.to_bits() | 1),
            9_007_199_254_740_993.0,
            4_503_599_627_370_497.5,
        ];
        for v in values {
            let mut p = Packed::default();
            p.keep(0, 70.0);
            p.keep(1, v);
            p.keep(2, 71.0);
            let back: Vec<_> = p.iter().map(|r| r.1.to_bits()).collect();
            assert_eq!(
                back,
                [70.0_f64.to_bits(), v.to_bits(), 71.0_f64.to_bits()],
                "{v:?}"
            );
        }
    }

    /// Instants anywhere in an i64, however far apart: a change of the gap
    /// too large to shift into the tagged varint is written after it.
    #[test]
    fn instants_at_the_ends_of_an_i64_come_back() {
        let instants = [
            i64::MIN,
            i64::MIN + 1,
            i64::MIN + 3,
            -1,
            0,
            i64::MAX - 2,
            i64::MAX - 1,
            i64::MAX,
        ];
        for scale_value in [72.0, 36.6, f64::NAN, f64::from_bits(1)] {
            let mut p = Packed::default();
            let mut model = Vec::new();
            for (i, &at) in instants.iter().enumerate() {
                let v = if i % 3 == 0 { scale_value } else { i as f64 };
                p.keep(at, v);
                model.push((at, v));
            }
            assert!(same(&p.iter().collect::<Vec<_>>(), &model));
            // In reverse: every reading late, each chunk re-encoded.
            let mut p = Packed::default();
            for &(at, v) in model.iter().rev() {
                p.keep(at, v);
            }
            assert!(same(&p.iter().collect::<Vec<_>>(), &model));
        }
    }

    /// A series that keeps fewer readings than a chunk (a small cap, or a
    /// horizon that holds a few sparse readings) appends to and pops from
    /// one chunk for as long as it lives: its memory stays bounded.
    #[test]
    fn a_series_that_keeps_few_readings_stays_small_however_long_it_lives() {
        for keep in [1, 2, 5, 60] {
            let mut p = Packed::default();
            let mut model = std::collections::VecDeque::new();
            for i in 0..20_000_i64 {
                let v = (70 + i % 9) as f64;
                p.keep(i * 1_000_000, v);
                model.push_back((i * 1_000_000, v));
                let n = p.len().saturating_sub(keep);
                p.drain_front(n);
                model.drain(..n);
            }
            let model: Vec<_> = model.into_iter().collect();
            assert!(same(&p.iter().collect::<Vec<_>>(), &model));
            // 16 bytes a reading unpacked; 20,000 readings' bytes if the
            // popped ones stayed.
            let bound = 256 + keep * 16;
            assert!(
                p.heap_bytes() < bound,
                "keeping {keep}: {} bytes",
                p.heap_bytes()
            );
        }
    }

    /// A series at its cap pops its oldest reading for every new one: the
    /// bytes of the popped ones are given back as it goes, not when their
    /// chunk is empty.
    #[test]
    fn a_series_at_its_cap_does_not_hold_the_bytes_of_popped_readings() {
        let mut d = Draw(11);
        let mut p = Packed::default();
        let mut hr = 72_i64;
        let mut most = 0;
        for i in 0..5_000 {
            hr = (hr + d.below(9) as i64 - 4).clamp(50, 120);
            p.keep(1_800_000_000_000_000 + i * 1_000_000, hr as f64);
            p.drain_front(p.len().saturating_sub(600));
            if i >= 600 {
                most = most.max(p.heap_bytes());
            }
        }
        // About a byte a reading and the chunks' own state (1,108 bytes);
        // 1,300 when the oldest chunk gave its bytes back only when empty.
        assert!(most < 1_200, "{most} bytes for 600 readings");
    }

    #[test]
    fn a_chunk_s_own_state_stays_small() {
        // Several a series, thousands of series: 104 bytes with
        // word-sized positions.
        assert!(std::mem::size_of::<Chunk>() <= 88);
    }

    /// What it is for: ten minutes of a 1 Hz wearable (600 readings, whole
    /// numbers, milliseconds of jitter) in a few bytes a reading.
    #[test]
    fn ten_minutes_of_a_wearable_take_a_few_bytes_a_reading() {
        let mut d = Draw(7);
        let mut p = Packed::default();
        let (mut t, mut hr) = (1_800_000_000_000_000_i64, 72_i64);
        for _ in 0..600 {
            t += 1_000_000 + d.below(5_000) as i64 - 2_500;
            hr = (hr + d.below(5) as i64 - 2).clamp(50, 120);
            p.keep(t, hr as f64);
        }
        let per_reading = p.heap_bytes() as f64 / 600.0;
        // 16 bytes a reading unpacked.
        assert!(per_reading < 5.0, "{per_reading:.2} bytes a reading");
        // And a temperature to one decimal, on an exact schedule.
        let mut p = Packed::default();
        for i in 0..600 {
            p.keep(i * 60_000_000, (368 + i % 5) as f64 / 10.0);
        }
        let per_reading = p.heap_bytes() as f64 / 600.0;
        assert!(per_reading < 3.5, "{per_reading:.2} bytes a reading");
        // A wearable on its schedule (the gap never changes): a heart rate
        // that moves a few beats takes one byte, the chunks' own state
        // included in the figure.
        let mut p = Packed::default();
        let mut hr = 72_i64;
        for i in 0..600 {
            hr = (hr + d.below(9) as i64 - 4).clamp(50, 120);
            p.keep(1_800_000_000_000_000 + i * 1_000_000, hr as f64);
        }
        let per_reading = p.heap_bytes() as f64 / 600.0;
        assert!(per_reading < 1.7, "{per_reading:.2} bytes a reading");
    }
}
