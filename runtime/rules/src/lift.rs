//! Lifting `on-batch`'s results (`list<result<list<output>, string>>`) out of a plugin's
//! memory into three flat vectors, rather than a `Vec` per message, a `Vec` per output and a
//! `Vec` per payload.
//!
//! wasmtime's generic lifting builds the nested vectors through its `WasmList` machinery; with
//! the identity rule that, with the two allocations per message it makes, was about a fifth of
//! a pipeline worker's time. Here one pass checks the results (bounds, alignment, variant
//! cases, UTF-8, and the same hostcall fuel wasmtime charges, so a plugin cannot make the host
//! copy more than wasmtime would let it) and sizes the vectors; a second copies the bytes.
//! What fails a check fails the call as wasmtime's lifting would (the batch then runs one
//! message at a time, where wasmtime's lifting reports it).
//!
//! It relies on wasmtime's `#[doc(hidden)]` lifting interface (the one its derive macros use),
//! pinned with wasmtime's exact version; the type check is the generated one, the layout below
//! is checked against the generated types before use (else the generic lifting runs), and a
//! test compares the results both ways (`a_batch_lifts_every_output_as_a_single_call_does`).

// Implementing wasmtime's lifting traits is `unsafe` (they promise to check what they read).
#![allow(unsafe_code)]

use std::ops::Range;

use wasmtime::ValRaw;
use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift};

use crate::Output;

/// What wasmtime lifts `on-batch`'s result into.
type Generic = Vec<Result<Vec<Output>, String>>;

// The canonical ABI layouts (alignment 4 throughout):
// result<list<output>, string>: case byte @0, (pointer, length) @4;
// output: topic option<string> (case byte @0, string @4), payload list<u8> @12.
const RESULT_SIZE: usize = 12;
const RESULT_PAYLOAD: usize = 4;
const OUTPUT_SIZE: usize = 20;
const OUTPUT_TOPIC: usize = 4;
const OUTPUT_PAYLOAD: usize = 12;

/// One message's result as lifted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lifted {
    /// Its outputs: a range of [`LiftedBatch::outputs`].
    Outputs(Range<u32>),
    /// The plugin's error message: a range of [`LiftedBatch::bytes`] (valid UTF-8).
    Error(Range<u32>),
}

/// One output as lifted: ranges of [`LiftedBatch::bytes`]; `topic` is valid UTF-8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub topic: Option<Range<u32>>,
    pub payload: Range<u32>,
}

/// `on-batch`'s results: one [`Lifted`] per message, in order.
#[derive(Debug, Default)]
pub(crate) struct LiftedBatch {
    pub results: Vec<Lifted>,
    pub outputs: Vec<Span>,
    pub bytes: Vec<u8>,
}

thread_local! {
    /// A lifted batch's vectors, emptied, for the next batch on this thread
    /// ([`LiftedBatch::recycle`]): new ones each time, kilobytes for the bytes, cost a
    /// `malloc` that made glibc consolidate its free lists for every batch.
    static SPARE: std::cell::Cell<LiftedBatch> = const {
        std::cell::Cell::new(LiftedBatch {
            results: Vec::new(),
            outputs: Vec::new(),
            bytes: Vec::new(),
        })
    };
}

/// Bytes of room a recycled batch may keep.
const SPARE_KEEP: usize = 256 << 10;

impl LiftedBatch {
    /// Empty vectors, with the room of a batch recycled earlier on this thread.
    fn spare() -> Self {
        SPARE.take()
    }

    /// Keeps this batch's vectors (emptied) for the next batch on this thread, unless they
    /// hold more room than a usual batch needs.
    pub(crate) fn recycle(mut self) {
        self.results.clear();
        self.outputs.clear();
        self.bytes.clear();
        if self.bytes.capacity() <= SPARE_KEEP
            && self.outputs.capacity() * size_of::<Span>() <= SPARE_KEEP
        {
            SPARE.set(self);
        }
    }

    /// The generic lifting's value in this form (copied).
    fn from_generic(results: Generic) -> wasmtime::Result<Self> {
        let mut batch = Self::default();
        for result in results {
            match result {
                Ok(outputs) => {
                    let first = u32::try_from(batch.outputs.len())?;
                    for output in outputs {
                        let topic = match output.topic {
                            Some(topic) => Some(batch.push(topic.as_bytes())?),
                            None => None,
                        };
                        let payload = batch.push(&output.payload)?;
                        batch.outputs.push(Span { topic, payload });
                    }
                    let end = u32::try_from(batch.outputs.len())?;
                    batch.results.push(Lifted::Outputs(first..end));
                }
                Err(message) => {
                    let range = batch.push(message.as_bytes())?;
                    batch.results.push(Lifted::Error(range));
                }
            }
        }
        Ok(batch)
    }

    fn push(&mut self, bytes: &[u8]) -> wasmtime::Result<Range<u32>> {
        let start = u32::try_from(self.bytes.len())?;
        self.bytes.extend_from_slice(bytes);
        Ok(start..u32::try_from(self.bytes.len())?)
    }
}

// SAFETY: the type information is the generic value's (same WIT type, same ABI).
unsafe impl ComponentType for LiftedBatch {
    type Lower = <Generic as ComponentType>::Lower;
    const ABI: CanonicalAbiInfo = <Generic as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Generic as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: every read is bounds-checked (slice indexing after the checks wasmtime makes), every
// string is checked to be UTF-8, and anything else fails the call.
unsafe impl Lift for LiftedBatch {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        if !fast(cx) {
            return Self::from_generic(Generic::linear_lift_from_flat(cx, ty, src)?);
        }
        let raw: &[ValRaw; 2] = src;
        lift(cx, raw[0].get_u32() as usize, raw[1].get_u32() as usize)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        if !fast(cx) {
            return Self::from_generic(Generic::linear_lift_from_memory(cx, ty, bytes)?);
        }
        let (ptr, len) = pointer_pair(bytes, 0);
        lift(cx, ptr, len)
    }
}

/// Whether the layout and string encoding are the ones [`lift`] is written for.
fn fast(cx: &LiftContext<'_>) -> bool {
    <Result<Vec<Output>, String> as ComponentType>::SIZE32 == RESULT_SIZE
        && <Result<Vec<Output>, String> as ComponentType>::ALIGN32 == 4
        && <Output as ComponentType>::SIZE32 == OUTPUT_SIZE
        && <Output as ComponentType>::ALIGN32 == 4
        && matches!(cx.options().string_encoding, StringEncoding::Utf8)
}

/// The (pointer, length) pair at `at` in `bytes`.
fn pointer_pair(bytes: &[u8], at: usize) -> (usize, usize) {
    let word = |i: usize| {
        let mut w = [0; 4];
        w.copy_from_slice(&bytes[i..i + 4]);
        u32::from_le_bytes(w) as usize
    };
    (word(at), word(at + 4))
}

/// `len` elements of `size` bytes at `ptr`, aligned to `align`, inside `memory`, charged to
/// the hostcall fuel as wasmtime charges a list of `host_size`-byte host values.
fn list<'m>(
    fuel: &mut Fuel<'_>,
    memory: &'m [u8],
    ptr: usize,
    len: usize,
    size: usize,
    align: usize,
    host_size: usize,
) -> wasmtime::Result<&'m [u8]> {
    let bytes = len
        .checked_mul(size)
        .filter(|&n| ptr.checked_add(n).is_some_and(|end| end <= memory.len()));
    let Some(bytes) = bytes else {
        wasmtime::bail!("list pointer/length out of bounds of memory");
    };
    match len.checked_mul(host_size) {
        Some(n) => fuel(n)?,
        None => wasmtime::bail!("too much data is being copied from the plugin"),
    }
    if !ptr.is_multiple_of(align) {
        wasmtime::bail!("list pointer is not aligned");
    }
    Ok(&memory[ptr..ptr + bytes])
}

/// A UTF-8 string at `ptr`, charged to the hostcall fuel as wasmtime charges it.
fn string<'m>(
    fuel: &mut Fuel<'_>,
    memory: &'m [u8],
    ptr: usize,
    len: usize,
) -> wasmtime::Result<&'m [u8]> {
    match ptr.checked_add(len) {
        Some(end) if end <= memory.len() => fuel(len)?,
        _ => wasmtime::bail!("string pointer/length out of bounds of memory"),
    }
    let bytes = &memory[ptr..ptr + len];
    std::str::from_utf8(bytes)?;
    Ok(bytes)
}

/// The pieces of one output in memory.
struct Raw<'m> {
    topic: Option<&'m [u8]>,
    payload: &'m [u8],
}

/// The output record in `record`.
fn output<'m>(fuel: &mut Fuel<'_>, memory: &'m [u8], record: &[u8]) -> wasmtime::Result<Raw<'m>> {
    let topic = match record[0] {
        0 => None,
        1 => {
            let (ptr, len) = pointer_pair(record, OUTPUT_TOPIC);
            Some(string(fuel, memory, ptr, len)?)
        }
        _ => wasmtime::bail!("invalid option discriminant"),
    };
    let (ptr, len) = pointer_pair(record, OUTPUT_PAYLOAD);
    let payload = list(fuel, memory, ptr, len, 1, 1, 1)?;
    Ok(Raw { topic, payload })
}

/// Charges the hostcall fuel (bytes the host is about to copy or allocate for the guest).
type Fuel<'a> = dyn FnMut(usize) -> wasmtime::Result<()> + 'a;

/// Lifts the list of `len` results at `ptr`.
fn lift(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> wasmtime::Result<LiftedBatch> {
    let memory = cx.memory();
    parse(memory, ptr, len, &mut |n| cx.consume_fuel(n))
}

/// [`lift`] over `memory`, charging `fuel`.
fn parse(
    memory: &[u8],
    ptr: usize,
    len: usize,
    fuel: &mut Fuel<'_>,
) -> wasmtime::Result<LiftedBatch> {
    let results = list(
        fuel,
        memory,
        ptr,
        len,
        RESULT_SIZE,
        4,
        size_of::<Result<Vec<Output>, String>>(),
    )?;

    // First pass: check everything and count.
    let (mut outputs, mut bytes) = (0usize, 0usize);
    for result in results.as_chunks::<RESULT_SIZE>().0 {
        let (ptr, len) = pointer_pair(result, RESULT_PAYLOAD);
        match result[0] {
            0 => {
                let records = list(fuel, memory, ptr, len, OUTPUT_SIZE, 4, size_of::<Output>())?;
                outputs += len;
                for record in records.as_chunks::<OUTPUT_SIZE>().0 {
                    let raw = output(fuel, memory, record)?;
                    bytes += raw.topic.map_or(0, <[u8]>::len) + raw.payload.len();
                }
            }
            1 => bytes += string(fuel, memory, ptr, len)?.len(),
            _ => wasmtime::bail!("invalid expected discriminant"),
        }
    }
    if u32::try_from(bytes).is_err() || u32::try_from(outputs).is_err() {
        wasmtime::bail!("a batch's results are too large");
    }

    // Second pass: copy. Everything was checked, and memory does not change in between.
    let mut batch = LiftedBatch::spare();
    batch.results.reserve(len);
    batch.outputs.reserve(outputs);
    batch.bytes.reserve(bytes);
    // Within u32: checked above.
    let push = |out: &mut Vec<u8>, piece: &[u8]| {
        let start = out.len() as u32;
        out.extend_from_slice(piece);
        start..out.len() as u32
    };
    for result in results.as_chunks::<RESULT_SIZE>().0 {
        let (ptr, len) = pointer_pair(result, RESULT_PAYLOAD);
        if result[0] == 0 {
            let first = batch.outputs.len() as u32;
            for record in memory[ptr..ptr + len * OUTPUT_SIZE]
                .as_chunks::<OUTPUT_SIZE>()
                .0
            {
                let topic = match record[0] {
                    0 => None,
                    _ => {
                        let (ptr, len) = pointer_pair(record, OUTPUT_TOPIC);
                        Some(push(&mut batch.bytes, &memory[ptr..ptr + len]))
                    }
                };
                let (ptr, len) = pointer_pair(record, OUTPUT_PAYLOAD);
                let payload = push(&mut batch.bytes, &memory[ptr..ptr + len]);
                batch.outputs.push(Span { topic, payload });
            }
            let end = batch.outputs.len() as u32;
            batch.results.push(Lifted::Outputs(first..end));
        } else {
            let range = push(&mut batch.bytes, &memory[ptr..ptr + len]);
            batch.results.push(Lifted::Error(range));
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory built by hand: what a plugin could return, well-formed or not.
    struct Memory(Vec<u8>);

    impl Memory {
        fn new() -> Self {
            Self(vec![0; 1024])
        }
        fn word(&mut self, at: usize, value: u32) -> &mut Self {
            self.0[at..at + 4].copy_from_slice(&value.to_le_bytes());
            self
        }
        fn byte(&mut self, at: usize, value: u8) -> &mut Self {
            self.0[at] = value;
            self
        }
        fn bytes(&mut self, at: usize, value: &[u8]) -> &mut Self {
            self.0[at..at + value.len()].copy_from_slice(value);
            self
        }
        fn parse(&self, ptr: usize, len: usize) -> wasmtime::Result<LiftedBatch> {
            self.parse_with_fuel(ptr, len, usize::MAX)
        }
        fn parse_with_fuel(
            &self,
            ptr: usize,
            len: usize,
            mut left: usize,
        ) -> wasmtime::Result<LiftedBatch> {
            parse(&self.0, ptr, len, &mut |n| match left.checked_sub(n) {
                Some(rest) => {
                    left = rest;
                    Ok(())
                }
                None => wasmtime::bail!("fuel exhausted"),
            })
        }
    }

    /// Two results at 0: `Ok([{topic: "t/é", payload: "abc"}, {topic: None, payload: ""}])`
    /// (records at 64) and `Err("bad")`.
    fn well_formed() -> Memory {
        let mut m = Memory::new();
        m.byte(0, 0).word(4, 64).word(8, 2);
        m.byte(12, 1).word(16, 300).word(20, 3);
        // First output: topic at 200, payload at 220.
        m.byte(64, 1)
            .word(68, 200)
            .word(72, 4)
            .word(76, 220)
            .word(80, 3);
        // Second: no topic, empty payload.
        m.byte(84, 0).word(96, 0).word(100, 0);
        m.bytes(200, "t/é".as_bytes())
            .bytes(220, b"abc")
            .bytes(300, b"bad");
        m
    }

    fn error(result: wasmtime::Result<LiftedBatch>) -> String {
        format!("{:#}", result.expect_err("refused"))
    }

    #[test]
    fn well_formed_results_are_lifted() {
        let batch = well_formed().parse(0, 2).unwrap();
        assert_eq!(batch.results, [Lifted::Outputs(0..2), Lifted::Error(7..10)]);
        assert_eq!(
            batch.outputs,
            [
                Span {
                    topic: Some(0..4),
                    payload: 4..7
                },
                Span {
                    topic: None,
                    payload: 7..7
                }
            ]
        );
        assert_eq!(batch.bytes, "t/éabcbad".as_bytes());
        assert!(well_formed().parse(0, 0).unwrap().results.is_empty());
    }

    /// Whatever a plugin returns, the host gets an error, never a panic or a read outside
    /// the plugin's memory.
    #[test]
    fn malformed_results_are_refused() {
        let m = well_formed();
        assert!(error(m.parse(1004, 2)).contains("out of bounds"));
        assert!(error(m.parse(0, 1 << 40)).contains("out of bounds"));
        assert!(error(m.parse(usize::MAX - 3, 1)).contains("out of bounds"));
        assert!(error(m.parse(2, 1)).contains("not aligned"));
        assert!(error(well_formed().byte(0, 2).parse(0, 2)).contains("discriminant"));
        assert!(error(well_formed().byte(64, 7).parse(0, 2)).contains("discriminant"));
        // Outputs: out of bounds, misaligned, too many.
        assert!(error(well_formed().word(4, 1020).parse(0, 1)).contains("out of bounds"));
        assert!(error(well_formed().word(4, 66).parse(0, 1)).contains("not aligned"));
        assert!(error(well_formed().word(8, u32::MAX).parse(0, 1)).contains("out of bounds"));
        // Strings and payloads out of bounds, or not UTF-8.
        assert!(error(well_formed().word(68, 1022).parse(0, 1)).contains("out of bounds"));
        assert!(error(well_formed().word(72, u32::MAX).parse(0, 1)).contains("out of bounds"));
        assert!(error(well_formed().word(80, 2000).parse(0, 1)).contains("out of bounds"));
        assert!(error(well_formed().word(16, 1023).parse(0, 2)).contains("out of bounds"));
        assert!(error(well_formed().byte(203, 0xff).parse(0, 1)).contains("utf-8"));
        assert!(error(well_formed().byte(301, 0xc3).parse(0, 2)).contains("utf-8"));
        // Payloads are bytes: anything goes.
        assert!(well_formed().byte(220, 0xff).parse(0, 2).is_ok());
    }

    /// The fuel is charged as wasmtime charges it: an exhausted budget refuses the results.
    #[test]
    fn fuel_bounds_what_is_copied() {
        let m = well_formed();
        let needed =
            2 * size_of::<Result<Vec<Output>, String>>() + 2 * size_of::<Output>() + 4 + 3 + 3;
        assert!(m.parse_with_fuel(0, 2, needed).is_ok());
        assert!(error(m.parse_with_fuel(0, 2, needed - 1)).contains("fuel"));
    }
}
