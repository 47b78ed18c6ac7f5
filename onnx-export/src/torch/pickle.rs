//! The pickle machine: the opcodes state dicts and configs use, with every size bounded.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::limits::*;
use super::objects::*;

pub(super) struct Machine<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) stack: Vec<Obj>,
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u64, Obj>,
    pub(super) ops: u64,
}

impl<'a> Machine<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            ops: 0,
        }
    }

    pub(super) fn bytes(&mut self, n: u64) -> PResult<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated at byte {}: an operand of {n} bytes, {left} left",
                self.pos
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.data[start..self.pos])
    }

    pub(super) fn u8(&mut self) -> PResult<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub(super) fn u16(&mut self) -> PResult<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self) -> PResult<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self) -> PResult<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A text operand, up to (not including) the next newline.
    pub(super) fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated at byte {}: an unterminated line", self.pos))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| "a text operand is not UTF-8".to_string())
    }

    pub(super) fn string(&mut self, n: u64) -> PResult<Obj> {
        let b = self.bytes(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "a string is not valid UTF-8".to_string())?;
        Ok(Obj::Str(Rc::from(s)))
    }

    pub(super) fn push(&mut self, o: Obj) {
        self.stack.push(o);
    }

    pub(super) fn pop(&mut self) -> PResult<Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an operation pops past a MARK".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    pub(super) fn top(&mut self) -> PResult<&mut Obj> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("an operation reads past a MARK".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }

    pub(super) fn pop_mark(&mut self) -> PResult<Vec<Obj>> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("a MARK past the stack".into());
        }
        Ok(self.stack.split_off(m))
    }

    pub(super) fn memo_get(&self, i: u64) -> PResult<Obj> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} is read before it is written"))
    }

    pub(super) fn memo_put(&mut self, i: u64) -> PResult<()> {
        let top = self.stack.last().cloned().ok_or("stack underflow")?;
        self.memo.insert(i, top);
        Ok(())
    }

    pub(super) fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        let g = Global::resolve(module, name)?;
        self.push(Obj::Global(g));
        Ok(())
    }

    pub(super) fn run(mut self) -> PResult<Obj> {
        loop {
            self.ops += 1;
            if self.ops > MAX_OPS {
                return Err(format!(
                    "more than {MAX_OPS} pickle operations: too large for a state dict"
                ));
            }
            let at = self.pos;
            let op = self.u8().map_err(|_| "ends without STOP".to_string())?;
            match op {
                // Framing and protocol.
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("pickle protocol {p} is newer than 5"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                // The stack.
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
                        self.pop_mark()?;
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?.clone();
                    self.push(t);
                }
                // Constants and numbers.
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(i64::from(v)));
                }
                0x8a => {
                    let n = self.u8()?;
                    let b = self.bytes(u64::from(n))?;
                    self.push(Obj::Int(long(b)?));
                }
                0x8b => {
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return Err("LONG4 with a negative length".into());
                    }
                    let b = self.bytes(n as u64)?;
                    self.push(Obj::Int(long(b)?));
                }
                b'I' => {
                    let l = self.line()?;
                    let o = match l {
                        "00" => Obj::Bool(false),
                        "01" => Obj::Bool(true),
                        _ => Obj::Int(
                            l.parse()
                                .map_err(|_| format!("INT `{l}` is not an integer"))?,
                        ),
                    };
                    self.push(o);
                }
                b'L' => {
                    let l = self.line()?;
                    let v = l
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| format!("LONG `{l}` is not a 64-bit integer"))?;
                    self.push(Obj::Int(v));
                }
                b'G' => {
                    let b = self.bytes(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Obj::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l
                        .parse()
                        .map_err(|_| format!("FLOAT `{l}` is not a number"))?;
                    self.push(Obj::Float(v));
                }
                // Strings and bytes.
                b'X' => {
                    let n = self.u32()?;
                    let s = self.string(u64::from(n))?;
                    self.push(s);
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(u64::from(n))?;
                    self.push(s);
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.push(s);
                }
                // Python 2 `str`: bytes that Python 3 reads as text.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = self.u32()? as i32;
                        if n < 0 {
                            return Err("BINSTRING with a negative length".into());
                        }
                        n as u64
                    } else {
                        u64::from(self.u8()?)
                    };
                    let b = self.bytes(n)?;
                    let s: String = b.iter().map(|&c| char::from(c)).collect();
                    self.push(Obj::Str(Rc::from(s)));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => u64::from(self.u32()?),
                        b'C' => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let b = self.bytes(n)?;
                    self.push(Obj::Bytes(Rc::from(b)));
                }
                // Containers.
                b']' => self.push(Obj::list(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::list(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b')' => self.push(Obj::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(Rc::from(items)));
                }
                b'}' => self.push(Obj::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Obj::Dict(Rc::new(RefCell::new(pairs))));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    self.set_items(p)?;
                }
                // Sets are read as lists: nothing here needs their semantics.
                0x8f => self.push(Obj::list(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Obj::list(items));
                }
                // The memo.
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u64::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(u64::from(i))?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let l = self.line()?;
                    let i = l
                        .parse()
                        .map_err(|_| format!("PUT `{l}` is not an index"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    let o = self.memo_get(u64::from(i))?;
                    self.push(o);
                }
                b'j' => {
                    let i = self.u32()?;
                    let o = self.memo_get(u64::from(i))?;
                    self.push(o);
                }
                b'g' => {
                    let l = self.line()?;
                    let i = l
                        .parse()
                        .map_err(|_| format!("GET `{l}` is not an index"))?;
                    let o = self.memo_get(i)?;
                    self.push(o);
                }
                // Globals: refused unless allow-listed, before anything uses them.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?;
                        }
                        _ => return Err("STACK_GLOBAL with operands that are not strings".into()),
                    }
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    return Err(refusal(module, name));
                }
                b'o' => return Err("refuses OBJ: it instantiates an arbitrary class".into()),
                0x82..=0x84 => {
                    return Err("refuses EXT opcodes: they name globals through copyreg".into());
                }
                0x97 | 0x98 => {
                    return Err("refuses out-of-band buffers (pickle protocol 5 buffers)".into());
                }
                // Calls: only to allow-listed functions.
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let r = call(&func, &args)?;
                    self.push(r);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Obj::Global(Global::OrderedDict) => {
                            args.items("NEWOBJ arguments")?;
                            self.push(Obj::Dict(Rc::new(RefCell::new(Vec::new()))));
                        }
                        Obj::Global(g) => {
                            return Err(format!("refuses to instantiate `{}`", g.name()));
                        }
                        other => {
                            return Err(format!("NEWOBJ of {}, not a class", other.kind()));
                        }
                    }
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // An OrderedDict's attributes (`_metadata`) and a tensor's Python
                        // attributes carry nothing Tiller reads.
                        Obj::Dict(_) | Obj::Tensor(_) => {}
                        other => return Err(format!("BUILD on {}", other.kind())),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_storage(&pid)?;
                    self.push(s);
                }
                b'P' => return Err("text persistent ids are not torch.save's".into()),
                other => {
                    return Err(format!(
                        "opcode 0x{other:02x} at byte {at} is not supported (not in pickle \
                         protocols 0-5 as state dicts use them)"
                    ));
                }
            }
        }
    }

    pub(super) fn append(&mut self, items: Vec<Obj>) -> PResult<()> {
        match self.top()? {
            Obj::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("APPEND to {}, not a list", other.kind())),
        }
    }

    pub(super) fn set_items(&mut self, p: Vec<(Obj, Obj)>) -> PResult<()> {
        match self.top()? {
            Obj::Dict(d) => {
                d.borrow_mut().extend(p);
                Ok(())
            }
            other => Err(format!("SETITEM on {}, not a dict", other.kind())),
        }
    }
}

/// A little-endian two's-complement integer of at most 8 bytes.
pub(super) fn long(b: &[u8]) -> PResult<i64> {
    if b.len() > 8 {
        return Err(format!(
            "an integer of {} bytes does not fit in 64 bits",
            b.len()
        ));
    }
    if b.is_empty() {
        return Ok(0);
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(a))
}

pub(super) fn pairs(items: Vec<Obj>) -> PResult<Vec<(Obj, Obj)>> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict with an odd number of keys and values".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::flatten::Flat;
    use super::*;

    fn run(p: &[u8]) -> PResult<Obj> {
        Machine::new(p).run()
    }

    #[test]
    fn plain_values() {
        // {'a': 1, 'b': [2.5, None, True], 'c': 'x'} at protocol 2.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00b]q\x01(G@\x04\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00cX\x01\x00\x00\x00xu.";
        let o = run(p).unwrap();
        let mut f = Flat::default();
        f.add(&o, String::new(), 0, &mut 1000).unwrap();
        assert_eq!(f.values["a"], Value::from(1));
        assert_eq!(f.values["b"], serde_json::json!([2.5, null, true]));
        assert_eq!(f.values["c"], Value::from("x"));
    }

    #[test]
    fn refuses_globals_when_named() {
        let e = run(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.").unwrap_err();
        assert!(e.contains("`os.system`"), "{e}");
        let e = run(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.").unwrap_err();
        assert!(e.contains("`builtins.eval`"), "{e}");
    }

    #[test]
    fn refuses_calls_to_types() {
        let e = run(b"\x80\x02ctorch\nFloatStorage\n)R.").unwrap_err();
        assert!(e.contains("refuses to call"), "{e}");
    }

    #[test]
    fn bounds_lengths_and_memo() {
        assert!(
            run(b"\x80\x02X\xff\xff\xff\xffab.")
                .unwrap_err()
                .contains("truncated")
        );
        assert!(run(b"\x80\x02h\x05.").unwrap_err().contains("memo"));
        assert!(run(b"\x80\x02").unwrap_err().contains("STOP"));
        assert!(
            run(b"\x80\x02\x8a\x0a0123456789.")
                .unwrap_err()
                .contains("64 bits")
        );
    }

    #[test]
    fn self_reference_is_bounded() {
        // l = []; l.append(l)
        let o = run(b"\x80\x02]q\x00h\x00a.").unwrap();
        let mut f = Flat::default();
        let mut budget = MAX_NODES;
        let e = f.add(&o, "l".into(), 0, &mut budget).unwrap_err();
        assert!(e.contains("nested"), "{e}");
    }

    #[test]
    fn negative_ints() {
        assert_eq!(long(&[0xff]).unwrap(), -1);
        assert_eq!(long(&[0x00, 0x80]).unwrap(), -32768);
        assert_eq!(long(&[0xff, 0x00]).unwrap(), 255);
    }
}
