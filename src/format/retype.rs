//! Changing the dtype of storages in a TorchScript archive's `data.pkl`,
//! which names each storage's type in its persistent id:
//! `('storage', torch.FloatStorage, KEY, LOCATION, NUMEL)`. The pickle is
//! read op by op (protocol 2 has no frames, so no offsets to fix), and the op
//! that names a retyped storage's class (a `GLOBAL`, or a `BINGET` of one)
//! becomes a `GLOBAL` of the new class. A `GLOBAL` is memoised for later
//! storages of its class: where one was replaced, those later storages (not
//! retyped) get a `GLOBAL` of their own class instead of the `BINGET`, and a
//! `BINGET` of it anywhere else is refused. (TorchScript's unpickler knows no
//! `POP`, which would have been simpler.) Nothing else changes.
use std::collections::HashMap;

use tch::Kind;

/// What an op left on top of the stack, as far as persistent ids need.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Str(String),
    Global(String, String),
    Int,
    Other,
}

/// An item, where the op that pushed it lies in the pickle, and the memo
/// index it was fetched from (`BINGET`) or stored in (a `BINPUT` after it).
#[derive(Debug, Clone)]
struct Spanned {
    item: Item,
    start: usize,
    end: usize,
    fetched: Option<u32>,
    stored: Option<u32>,
}

/// The pickle `program` with the storages `retype` names (by key) given the
/// new dtypes; an error says why a pickle cannot be rewritten (an op this
/// reader does not know, protocol 4 framing).
pub fn retype_storages(program: &[u8], retype: &HashMap<String, Kind>) -> Result<Vec<u8>, String> {
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new(); // (at, bytes removed, bytes inserted)
                                                              // Memo indices whose class `GLOBAL` was replaced; `BINGET`s of them (by
                                                              // position) and those of them that were rewritten.
    let mut replaced_memo: std::collections::HashSet<u32> = Default::default();
    let mut gets: Vec<(usize, u32)> = Vec::new();
    let mut rewritten_gets: std::collections::HashSet<usize> = Default::default();
    let mut memo: HashMap<u32, Item> = HashMap::new();
    let mut frames: Vec<Vec<Spanned>> = vec![Vec::new()];
    let mut last = Item::Other;
    // A tuple that may be a storage's persistent id: its key and class.
    let mut pending: Option<(String, Spanned)> = None;
    let mut found = 0usize;
    let mut at = 0usize;
    let take =
        |at: usize, n: usize| program.get(at..at + n).ok_or_else(|| "the pickle ends early".to_string());
    let line = |at: usize| -> Result<(&[u8], usize), String> {
        let rest = program.get(at..).ok_or("the pickle ends early")?;
        let end = rest.iter().position(|&b| b == b'\n').ok_or("a line without its end")?;
        Ok((&rest[..end], at + end + 1))
    };
    let le = |bytes: &[u8]| bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64);
    loop {
        let start = at;
        let op = *program.get(at).ok_or("the pickle ends before STOP")?;
        at += 1;
        // What the op pushes (None: it pushes nothing we track) and how many it pops.
        let mut pushed: Option<Item> = None;
        let mut fetched: Option<u32> = None;
        let mut pops = 0usize;
        match op {
            b'.' => break,
            b'\x80' => at += 1,
            b'(' => frames.push(Vec::new()),
            b'q' | b'r' => {
                let n = if op == b'q' { 1 } else { 4 };
                let index = le(take(at, n)?) as u32;
                at += n;
                memo.insert(index, last.clone());
                if let Some(top) = frames.last_mut().and_then(|f| f.last_mut()) {
                    if top.end == start {
                        top.stored = Some(index);
                    }
                }
                continue;
            }
            b'h' | b'j' => {
                let n = if op == b'h' { 1 } else { 4 };
                let index = le(take(at, n)?) as u32;
                at += n;
                gets.push((start, index));
                fetched = Some(index);
                pushed =
                    Some(memo.get(&index).cloned().ok_or_else(|| format!("BINGET of unset memo {index}"))?);
            }
            b'c' => {
                let (module, next) = line(at)?;
                let (name, next) = line(next)?;
                at = next;
                pushed = Some(Item::Global(
                    String::from_utf8_lossy(module).into_owned(),
                    String::from_utf8_lossy(name).into_owned(),
                ));
            }
            b'X' => {
                let n = le(take(at, 4)?) as usize;
                let text = take(at + 4, n)?;
                at += 4 + n;
                pushed = Some(Item::Str(String::from_utf8_lossy(text).into_owned()));
            }
            b'\x8c' => {
                let n = take(at, 1)?[0] as usize;
                let text = take(at + 1, n)?;
                at += 1 + n;
                pushed = Some(Item::Str(String::from_utf8_lossy(text).into_owned()));
            }
            b'K' => (at, pushed) = (at + 1, Some(Item::Int)),
            b'M' => (at, pushed) = (at + 2, Some(Item::Int)),
            b'J' => (at, pushed) = (at + 4, Some(Item::Int)),
            b'\x8a' => {
                let n = take(at, 1)?[0] as usize;
                (at, pushed) = (at + 1 + n, Some(Item::Int));
            }
            b'\x8b' | b'T' | b'B' => {
                let n = le(take(at, 4)?) as usize;
                (at, pushed) = (at + 4 + n, Some(Item::Other));
            }
            b'U' | b'C' => {
                let n = take(at, 1)?[0] as usize;
                (at, pushed) = (at + 1 + n, Some(Item::Other));
            }
            b'G' => (at, pushed) = (at + 8, Some(Item::Other)),
            b'I' | b'L' | b'F' | b'S' | b'V' => {
                let (_, next) = line(at)?;
                (at, pushed) = (next, Some(Item::Other));
            }
            b'N' | b'\x88' | b'\x89' | b']' | b')' | b'}' | b'\x8f' => pushed = Some(Item::Other),
            b't' | b'l' | b'd' | b'\x91' => {
                // Items since the mark become one.
                let items = frames.pop().ok_or("a tuple without its mark")?;
                if frames.is_empty() {
                    return Err("a tuple without its mark".into());
                }
                if op == b't' {
                    if let [a, class, k, loc, n] = items.as_slice() {
                        if let (
                            Item::Str(kind),
                            Item::Global(m, c),
                            Item::Str(key),
                            Item::Str(_),
                            Item::Int,
                        ) = (&a.item, &class.item, &k.item, &loc.item, &n.item)
                        {
                            if kind == "storage" && m == "torch" && c.ends_with("Storage") {
                                pending = Some((key.clone(), class.clone()));
                            }
                        }
                    }
                }
                frames.last_mut().ok_or("a tuple without its mark")?.push(Spanned {
                    item: Item::Other,
                    start,
                    end: at,
                    fetched: None,
                    stored: None,
                });
                last = Item::Other;
                continue;
            }
            b'e' | b'u' | b'\x90' | b'1' => {
                frames.pop().ok_or("an op without its mark")?;
                if frames.is_empty() {
                    return Err("an op without its mark".into());
                }
                continue;
            }
            b'Q' => {
                if let Some((key, class)) = pending.take() {
                    let Item::Global(_, old) = &class.item else { unreachable!("matched as a global") };
                    let new = match retype.get(&key) {
                        Some(&kind) => Some(
                            super::torch_pickle::storage_name(kind.into())
                                .ok_or_else(|| format!("no storage type for {kind:?}"))?,
                        ),
                        // A storage kept as it was, whose class is fetched from a
                        // memoised GLOBAL that was replaced: named again.
                        None if class.fetched.is_some_and(|i| replaced_memo.contains(&i)) => {
                            Some(old.clone())
                        }
                        None => None,
                    };
                    if let Some(name) = new {
                        edits.push((
                            class.start,
                            class.end - class.start,
                            format!("ctorch\n{name}\n").into_bytes(),
                        ));
                        if retype.contains_key(&key) {
                            found += 1;
                        }
                        if let Some(i) = class.stored {
                            replaced_memo.insert(i);
                        }
                        if class.fetched.is_some() {
                            rewritten_gets.insert(class.start);
                        }
                    }
                }
                pops = 1;
                pushed = Some(Item::Other);
            }
            b'R' | b'\x81' | b'\x93' => (pops, pushed) = (2, Some(Item::Other)),
            b'\x85' => (pops, pushed) = (1, Some(Item::Other)),
            b'\x86' => (pops, pushed) = (2, Some(Item::Other)),
            b'\x87' => (pops, pushed) = (3, Some(Item::Other)),
            b'b' | b'a' | b'0' => pops = 1,
            b's' => pops = 2,
            b'2' => pushed = Some(last.clone()),
            other => {
                return Err(format!(
                "opcode 0x{other:02x} at byte {start} is not one TorchScript's pickler writes (protocol 2)"
            ))
            }
        }
        if op != b'Q' {
            // Anything but a memoisation between a storage's tuple and its
            // BINPERSID means it was not one.
            pending = None;
        }
        if let Some(frame) = frames.last_mut() {
            for _ in 0..pops {
                frame.pop();
            }
            if let Some(item) = pushed {
                frame.push(Spanned { item: item.clone(), start, end: at, fetched, stored: None });
                last = item;
            }
        }
    }
    if let Some((at, index)) =
        gets.iter().find(|(at, index)| replaced_memo.contains(index) && !rewritten_gets.contains(at))
    {
        return Err(format!("byte {at} fetches storage class memo {index} outside a storage's id"));
    }
    if found != retype.len() {
        return Err(format!("{} of {} storages to retype were found in the pickle", found, retype.len()));
    }
    let mut out = Vec::with_capacity(program.len() + edits.len() * 32);
    let mut from = 0;
    edits.sort_by_key(|e| e.0);
    for (at, remove, insert) in edits {
        out.extend_from_slice(&program[from..at]);
        out.extend_from_slice(&insert);
        from = at + remove;
    }
    out.extend_from_slice(&program[from..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::retype_storages;
    use std::collections::HashMap;
    use tch::Kind;

    fn unicode(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// `('storage', torch.FloatStorage, KEY, 'cpu', 4)` as TorchScript's
    /// pickler writes it: the class by GLOBAL (memoised as 0) the first time,
    /// by BINGET after.
    fn storage_id(key: &str, first: bool) -> Vec<u8> {
        let mut p = vec![b'('];
        p.extend(unicode("storage"));
        if first {
            p.extend_from_slice(b"ctorch\nFloatStorage\nq\x00");
        } else {
            p.extend_from_slice(b"h\x00");
        }
        p.extend(unicode(key));
        p.extend(unicode("cpu"));
        p.extend_from_slice(b"K\x04tQ");
        p
    }

    fn program(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut p = b"\x80\x02]".to_vec(); // a list to hold the storages
        for part in parts {
            p.extend_from_slice(part);
            p.push(b'a');
        }
        p.push(b'.');
        p
    }

    #[test]
    fn retyped_storages_name_their_new_class_and_the_others_keep_theirs() {
        let p = program(&[storage_id("0", true), storage_id("1", false), storage_id("2", false)]);
        let retype = HashMap::from([("0".to_string(), Kind::Half), ("2".to_string(), Kind::BFloat16)]);
        let out = retype_storages(&p, &retype).unwrap();
        let text = String::from_utf8_lossy(&out);
        // 0: its GLOBAL replaced (still memoised); 1: named FloatStorage again
        // rather than fetching the replaced memo; 2: its own new class.
        let classes: Vec<&str> =
            text.match_indices("ctorch\n").map(|(i, _)| text[i + 7..].split('\n').next().unwrap()).collect();
        assert_eq!(classes, ["HalfStorage", "FloatStorage", "BFloat16Storage"]);
        assert!(!out.windows(2).any(|w| w == b"h\x00"), "a BINGET of the replaced class is left");
        // Nothing to retype: the pickle as it was.
        assert_eq!(retype_storages(&p, &HashMap::new()).unwrap(), p);
    }

    #[test]
    fn what_cannot_be_rewritten_is_refused() {
        let p = program(&[storage_id("0", true)]);
        let missing = HashMap::from([("9".to_string(), Kind::Half)]);
        assert!(retype_storages(&p, &missing).unwrap_err().contains("0 of 1"));
        let mut framed = p.clone();
        framed.insert(2, 0x95);
        assert!(retype_storages(&framed, &HashMap::new()).unwrap_err().contains("0x95"));
        // The replaced class fetched outside a storage's id.
        let mut elsewhere = program(&[storage_id("0", true)]);
        elsewhere.pop();
        elsewhere.extend_from_slice(b"h\x00a.");
        let retype = HashMap::from([("0".to_string(), Kind::Half)]);
        assert!(retype_storages(&elsewhere, &retype).unwrap_err().contains("outside a storage"));
        assert!(retype_storages(b"\x80\x02", &retype).is_err(), "no STOP");
    }
}
