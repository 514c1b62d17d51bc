//! Lowering a batch of messages into a plugin's memory (`on-batch`'s argument) with one view
//! of that memory for the whole batch.
//!
//! wasmtime's generic lowering looks the instance's memory up again for every field it writes
//! (`LowerContext::get` and `as_slice_mut` resolve the instance and its canonical options each
//! time): about fifteen lookups per message, which `perf` put at a tenth of a pipeline
//! worker's time with the identity rule. Here the batch's strings and lists are allocated in
//! the guest first (the same `realloc` calls, in the same order, as the canonical ABI
//! prescribes and wasmtime makes), then every message's bytes and record are written through
//! one view of memory. Plugins see exactly what the generic lowering gives them.
//!
//! It relies on wasmtime's `#[doc(hidden)]` lowering interface (the one its derive macros
//! use), pinned with wasmtime's exact version; the type check is the generated record's, and
//! the layout below is checked against it, and a test compares what a plugin receives both
//! ways (`a_batch_lowers_every_field_as_a_single_call_does`).

// Implementing wasmtime's lowering traits is `unsafe` (they promise the bytes match the type).
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};

use crate::RuleMessage;

/// A [`RuleMessage`] that lowers in a list with [`Lower::linear_store_list_to_memory`] below.
#[repr(transparent)]
pub(crate) struct Batched<'a>(pub RuleMessage<'a>);

/// `msgs` as [`Batched`] (no copy).
pub(crate) fn batched<'s, 'a>(msgs: &'s [RuleMessage<'a>]) -> &'s [Batched<'a>] {
    // SAFETY: `Batched` is a `repr(transparent)` wrapper of `RuleMessage`.
    unsafe { std::slice::from_raw_parts(msgs.as_ptr().cast(), msgs.len()) }
}

// The canonical ABI layout of the WIT record `message` (alignment 4):
// topic: string @0, payload: list<u8> @8, qos: u8 @16, retain: bool @17,
// content-type: option<string> @20 (case byte, string @24), user-properties: list @32.
const SIZE: usize = 40;
const TOPIC: usize = 0;
const PAYLOAD: usize = 8;
const QOS: usize = 16;
const RETAIN: usize = 17;
const CONTENT_TYPE: usize = 20;
const USER_PROPERTIES: usize = 32;
/// A `tuple<string, string>`: two (pointer, length) pairs.
const PAIR: usize = 16;
/// Strings and lists longer than this are refused, as wasmtime does.
const MAX_LEN: usize = (1 << 31) - 1;

// SAFETY: everything is the generated record's (same WIT type, same ABI), see `Lower` below.
unsafe impl ComponentType for Batched<'_> {
    type Lower = <RuleMessage<'static> as ComponentType>::Lower;
    const ABI: CanonicalAbiInfo = <RuleMessage<'static> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <RuleMessage<'static> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: single values lower as the generated record does; lists write the same bytes.
unsafe impl Lower for Batched<'_> {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        self.0.linear_lower_to_flat(cx, ty, dst)
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        self.0.linear_lower_to_memory(cx, ty, offset)
    }

    fn linear_store_list_to_memory<T>(
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        mut offset: usize,
        items: &[Self],
    ) -> wasmtime::Result<()> {
        if Self::SIZE32 != SIZE
            || Self::ALIGN32 != 4
            || !matches!(cx.options().string_encoding, StringEncoding::Utf8)
        {
            // Not the layout or encoding this is written for: the generic way.
            for item in items {
                item.0.linear_lower_to_memory(cx, ty, offset)?;
                offset += Self::SIZE32;
            }
            return Ok(());
        }
        // Every allocation first, in the order of the generic lowering (each may grow memory,
        // which moves it), then one view of memory to write the whole list.
        let mut placed = Vec::with_capacity(items.len());
        let mut pairs = Vec::new();
        for item in items {
            placed.push(allocate(cx, &item.0, &mut pairs)?);
        }
        let memory = cx.as_slice_mut();
        for (item, place) in items.iter().zip(&placed) {
            write(memory, offset, &item.0, place, &pairs);
            offset += SIZE;
        }
        Ok(())
    }
}

/// Guest memory for `len` bytes (`align` as the canonical ABI asks for the type).
fn alloc<T>(cx: &mut LowerContext<'_, T>, align: u32, len: usize) -> wasmtime::Result<u32> {
    if len > MAX_LEN {
        wasmtime::bail!("a value of {len} bytes is too large to copy into the plugin");
    }
    let ptr = cx.realloc(0, 0, align, len)?;
    Ok(u32::try_from(ptr)?)
}

/// Where a message's strings and lists were allocated in the guest.
struct Placed {
    topic: u32,
    payload: u32,
    content_type: Option<u32>,
    properties: u32,
    /// The first of its user properties' (key, value) pointers in the list's `pairs`.
    pairs: u32,
}

/// Allocates `msg`'s strings and lists in the guest, in the generic lowering's order;
/// appends its user properties' pointers to `pairs`.
fn allocate<T>(
    cx: &mut LowerContext<'_, T>,
    msg: &RuleMessage<'_>,
    pairs: &mut Vec<[u32; 2]>,
) -> wasmtime::Result<Placed> {
    let topic = alloc(cx, 1, msg.topic.len())?;
    let payload = alloc(cx, 1, msg.payload.len())?;
    let content_type = match msg.content_type {
        Some(ct) => Some(alloc(cx, 1, ct.len())?),
        None => None,
    };
    let properties_len = msg
        .user_properties
        .len()
        .checked_mul(PAIR)
        .ok_or_else(|| wasmtime::format_err!("too many user properties"))?;
    let properties = alloc(cx, 4, properties_len)?;
    let first = u32::try_from(pairs.len())?;
    for (key, value) in msg.user_properties {
        pairs.push([alloc(cx, 1, key.len())?, alloc(cx, 1, value.len())?]);
    }
    Ok(Placed {
        topic,
        payload,
        content_type,
        properties,
        pairs: first,
    })
}

/// Writes `msg`'s bytes where `place` says and its record at `offset`. `realloc` checked
/// every range.
fn write(
    memory: &mut [u8],
    offset: usize,
    msg: &RuleMessage<'_>,
    place: &Placed,
    pairs: &[[u32; 2]],
) {
    let mut put = |at: usize, bytes: &[u8]| memory[at..at + bytes.len()].copy_from_slice(bytes);
    let pair = |ptr: u32, len: usize| -> [u8; 8] {
        let mut out = [0; 8];
        out[..4].copy_from_slice(&ptr.to_le_bytes());
        // Lengths were checked against `MAX_LEN` by `alloc`.
        out[4..].copy_from_slice(&(len as u32).to_le_bytes());
        out
    };
    put(place.topic as usize, msg.topic.as_bytes());
    put(place.payload as usize, msg.payload);
    let mut record = [0u8; SIZE];
    record[TOPIC..TOPIC + 8].copy_from_slice(&pair(place.topic, msg.topic.len()));
    record[PAYLOAD..PAYLOAD + 8].copy_from_slice(&pair(place.payload, msg.payload.len()));
    record[QOS] = msg.qos;
    record[RETAIN] = u8::from(msg.retain);
    if let (Some(ct), Some(ptr)) = (msg.content_type, place.content_type) {
        put(ptr as usize, ct.as_bytes());
        record[CONTENT_TYPE] = 1;
        record[CONTENT_TYPE + 4..CONTENT_TYPE + 12].copy_from_slice(&pair(ptr, ct.len()));
    }
    let own = &pairs[place.pairs as usize..][..msg.user_properties.len()];
    for (i, ((key, value), [k, v])) in msg.user_properties.iter().zip(own).enumerate() {
        put(*k as usize, key.as_bytes());
        put(*v as usize, value.as_bytes());
        let at = place.properties as usize + i * PAIR;
        put(at, &pair(*k, key.len()));
        put(at + 8, &pair(*v, value.len()));
    }
    record[USER_PROPERTIES..USER_PROPERTIES + 8]
        .copy_from_slice(&pair(place.properties, msg.user_properties.len()));
    put(offset, &record);
}
