//! A pickle reader for what `torch.save` writes, that never runs code.
//!
//! It is a stack machine over the opcodes of protocols 2–5 that data needs.
//! Nothing is ever imported or called. `GLOBAL` / `STACK_GLOBAL` sort names in
//! three ([`admission`]): the allow-list (tensors, containers, plain values,
//! numpy), whose meaning the torch reader knows; globals that execute code or
//! touch the system (`os.system`, `builtins.eval`, … — [`dangerous`]), which
//! are refused by name, so that a hostile file is said to be one; and every
//! other class or function (`argparse.Namespace`, a model's own class), which
//! becomes an inert placeholder ([`Value::Inert`]) recording its name, the
//! arguments it would have been called with and the state `BUILD` would have
//! given it. `REDUCE` and `BUILD` only record.
//!
//! Containers live in an arena and values refer to them by index, so shared
//! references behave as in Python (a memoised dict filled later is the same
//! dict), cycles cannot leak, and nothing is dropped recursively however deep
//! the nesting. Every length is checked against the bytes left; limits bound
//! the work and memory a hostile file can cause.
//!
//! Long because it is one state machine: every opcode it accepts, and the
//! bounds each one checks, read in one place.
use std::collections::HashMap;
use std::rc::Rc;

/// A pickled value. Containers are indices into [`Machine::objects`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// An integer that does not.
    BigInt,
    /// A float.
    Float(f64),
    /// A string.
    Str(Rc<str>),
    /// Bytes.
    Bytes(Rc<[u8]>),
    /// An allow-listed global (`module`, `name`), never called.
    Global(Sym, Sym),
    /// Any other harmless global (`argparse`, `Namespace`): a placeholder for
    /// what unpickling would have imported, never imported or called.
    Inert(Sym, Sym),
    /// A persistent id (`BINPERSID`): the torch reader resolves it.
    Persistent(usize),
    /// A container or reduced object in the arena.
    Ref(usize),
}

/// A global's module or name, behind one thin pointer: a [`Value`] is as
/// large as its largest variant, and values are made several per tensor (24
/// bytes with this, 40 with two `Rc<str>`). Globals are few (the pickler
/// memoises them), so the second allocation costs nothing that counts.
#[derive(Clone, PartialEq)]
pub struct Sym(Rc<Box<str>>);

impl std::ops::Deref for Sym {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Sym {
    fn from(s: &str) -> Self {
        Self(Rc::new(s.into()))
    }
}

impl std::fmt::Display for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl std::fmt::Debug for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// What an arena slot holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict (in insertion order) and, after `BUILD`, its attributes.
    Dict(Vec<(Value, Value)>, Vec<(Value, Value)>),
    /// A set.
    Set(Vec<Value>),
    /// `callable(*args)`, recorded, not run; `state` from a later `BUILD`.
    Reduce {
        /// The allow-listed callable.
        callable: Value,
        /// Its arguments (a tuple).
        args: Value,
        /// What `BUILD` gave it.
        state: Option<Value>,
    },
}

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum PickleError {
    /// The bytes end in the middle of an opcode.
    Truncated,
    /// An opcode this reader does not know.
    UnknownOpcode(u8, usize),
    /// A global outside the allow-list.
    ForbiddenGlobal(String),
    /// Malformed content.
    Malformed(String),
    /// A limit was reached.
    TooLarge(String),
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickleError::Truncated => f.write_str("the pickle ends early (truncated file?)"),
            PickleError::UnknownOpcode(op, at) => write!(f, "unknown pickle opcode 0x{op:02x} at byte {at}"),
            PickleError::ForbiddenGlobal(name) => write!(
                f,
                "the pickle calls {name}, which executes code or touches the system: the file is hostile \
                 (or made to run code when loaded) and is not allowed; nothing was executed"
            ),
            PickleError::Malformed(m) => write!(f, "malformed pickle: {m}"),
            PickleError::TooLarge(m) => write!(f, "pickle exceeds a limit: {m}"),
        }
    }
}

type Result<T> = std::result::Result<T, PickleError>;

/// Bounds on what a pickle may ask for.
pub const MAX_OPS: usize = 50_000_000;
/// Most arena objects a pickle may create.
pub const MAX_OBJECTS: usize = 20_000_000;
/// Deepest the value stack may grow.
pub const MAX_STACK: usize = 1_000_000;

/// Whether `module.name` may appear in a checkpoint. Nothing is ever called;
/// these are the names tensors, state dicts and plain values need.
pub fn allowed(module: &str, name: &str) -> bool {
    match module {
        "collections" => matches!(name, "OrderedDict" | "defaultdict" | "Counter"),
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor"
                | "_rebuild_tensor_v2"
                | "_rebuild_tensor_v3"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
        ),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch.nn.parameter" => name == "Parameter",
        "torch" => {
            name.ends_with("Storage")
                || matches!(name, "Size" | "device" | "Tensor")
                || crate::dtype::parse(name).is_some()
                || matches!(
                    name,
                    "float" | "double" | "half" | "long" | "int" | "short" | "bool" | "uint8" | "int8"
                )
        }
        "torch.storage" => matches!(name, "UntypedStorage" | "TypedStorage" | "_load_from_bytes"),
        // A layout by its name (Distributed Checkpoint metadata).
        "torch.serialization" => name == "_get_layout",
        // TorchScript's typed lists and type tags in a module's data.pkl.
        "torch.jit._pickle" => matches!(
            name,
            "build_intlist" | "build_tensorlist" | "build_doublelist" | "build_boollist" | "restore_type_tag"
        ),
        "builtins" | "__builtin__" => matches!(name, "set" | "frozenset" | "slice" | "complex" | "bytearray"),
        "_codecs" => name == "encode",
        "numpy.core.multiarray" | "numpy._core.multiarray" => matches!(name, "scalar" | "_reconstruct"),
        "numpy" => matches!(name, "dtype" | "ndarray"),
        _ => false,
    }
}

/// What may become of a global a pickle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// On the allow-list: its meaning is known.
    Allowed,
    /// Harmless as a name: kept as an inert placeholder.
    Inert,
    /// Executes code or touches the system: the pickle is refused.
    Refused,
}

/// Modules whose every name executes code, reaches the system or loads more
/// pickles. (Kept as the README's list.)
const DANGEROUS_MODULES: &[&str] = &[
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "runpy",
    "importlib",
    "pickle",
    "_pickle",
    "cPickle",
    "marshal",
    "ctypes",
    "code",
    "codeop",
    "pty",
    "multiprocessing",
    "threading",
    "_thread",
    "signal",
    "webbrowser",
    "commands",
    "popen2",
    "pdb",
    "bdb",
    "timeit",
    "shelve",
    "tempfile",
    "glob",
    "io",
    "_io",
    "urllib",
    "http",
    "ftplib",
    "smtplib",
    "telnetlib",
    "asyncio",
    "platform",
    "sysconfig",
    "zipimport",
    "pkgutil",
    "site",
    "gc",
    "inspect",
    "types",
    "dill",
    "cloudpickle",
    "_posixsubprocess",
    "selectors",
    "mmap",
];

/// Names of `builtins` that execute code or reach the system.
const DANGEROUS_BUILTINS: &[&str] = &[
    "eval",
    "exec",
    "execfile",
    "compile",
    "getattr",
    "setattr",
    "delattr",
    "__import__",
    "open",
    "input",
    "breakpoint",
    "globals",
    "locals",
    "vars",
    "exit",
    "quit",
    "help",
    "reload",
    "file",
    "apply",
];

/// Whether `module.name` executes code, touches the system or loads code or
/// pickles when called (see the README's list): such a pickle is refused.
pub fn dangerous(module: &str, name: &str) -> bool {
    let top = module.split('.').next().unwrap_or(module);
    // A qualified name reaches an attribute of a class (`Path.write_text`),
    // which a REDUCE would call: only plain class and function names are kept.
    let qualified = name.contains('.');
    let dunder = name.len() > 4 && name.starts_with("__") && name.ends_with("__");
    DANGEROUS_MODULES.contains(&top)
        || (matches!(module, "builtins" | "__builtin__") && DANGEROUS_BUILTINS.contains(&name))
        || (module == "operator" && matches!(name, "attrgetter" | "methodcaller"))
        || (module == "torch" && matches!(name, "load" | "save"))
        || [
            "torch.hub",
            "torch.jit",
            "torch.serialization",
            "torch.package",
            "torch.utils.cpp_extension",
            "torch._inductor",
            "torch._dynamo",
            "torch.distributed.rpc",
            "torch._C",
            "torch.ops",
            "numpy.lib.format",
            "numpy.load",
        ]
        .iter()
        .any(|m| module == *m || module.starts_with(&format!("{m}.")))
        || qualified
        || dunder
}

/// What becomes of the global `module.name`.
pub fn admission(module: &str, name: &str) -> Admission {
    if allowed(module, name) {
        Admission::Allowed
    } else if dangerous(module, name) {
        Admission::Refused
    } else {
        Admission::Inert
    }
}

/// The stack machine: run it over a pickle, then read [`Machine::objects`].
#[derive(Debug, Default)]
pub struct Machine {
    /// Every container and reduced object created.
    pub objects: Vec<Object>,
    /// Persistent ids, in order of appearance (`Value::Persistent` indexes here).
    pub persistent: Vec<Value>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Memo,
    /// Where each key of a dict is among its items, by dict: a key set twice
    /// keeps its first place and takes the last value, as Python's dict does.
    dict_keys: HashMap<usize, HashMap<DictKey, usize>>,
    /// Every global the pickle named (`module`, `name`), once each.
    pub globals: std::collections::HashSet<(String, String)>,
    /// A bound on objects below [`MAX_OBJECTS`], for pickles whose size in
    /// objects is known from what they describe.
    max_objects: Option<usize>,
}

/// The memo: Python's picklers number what they memoise 0, 1, 2, … in
/// order, so values are kept in a vector (one `Value` each) while the keys
/// come in that order; a key out of order (a hand-made pickle) moves them all
/// to a map.
#[derive(Debug, Default)]
struct Memo {
    dense: Vec<Value>,
    sparse: HashMap<u32, Value>,
}

impl Memo {
    fn len(&self) -> usize {
        self.dense.len() + self.sparse.len()
    }
    fn insert(&mut self, key: u32, value: Value) {
        if self.sparse.is_empty() {
            if key as usize == self.dense.len() {
                return self.dense.push(value);
            }
            if let Some(slot) = self.dense.get_mut(key as usize) {
                *slot = value;
                return;
            }
            self.sparse = self.dense.drain(..).enumerate().map(|(i, v)| (i as u32, v)).collect();
        }
        self.sparse.insert(key, value);
    }
    fn get(&self, key: u32) -> Option<&Value> {
        if self.sparse.is_empty() {
            self.dense.get(key as usize)
        } else {
            self.sparse.get(&key)
        }
    }
}

/// A dict key as Python compares keys: `1`, `True` and `1.0` are one key.
#[derive(Debug, PartialEq, Eq, Hash)]
enum DictKey {
    None,
    Int(i64),
    Float(u64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
}

impl DictKey {
    /// `None` for keys compared by identity (containers, NaN) or too large to compare here.
    fn of(v: &Value) -> Option<DictKey> {
        Some(match v {
            Value::None => DictKey::None,
            Value::Bool(b) => DictKey::Int(*b as i64),
            Value::Int(i) => DictKey::Int(*i),
            Value::Float(f) if f.is_nan() => return None,
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => DictKey::Int(*f as i64),
            Value::Float(f) => DictKey::Float(f.to_bits()),
            Value::Str(s) => DictKey::Str(s.clone()),
            Value::Bytes(b) => DictKey::Bytes(b.clone()),
            _ => return None,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or(PickleError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(PickleError::Truncated)?;
        self.at = end;
        Ok(slice)
    }
    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| PickleError::Truncated)?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| PickleError::Truncated)?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| PickleError::Truncated)?))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = self.bytes.get(self.at..).ok_or(PickleError::Truncated)?;
        let end = rest.iter().position(|&b| b == b'\n').ok_or(PickleError::Truncated)?;
        let line = std::str::from_utf8(&rest[..end])
            .map_err(|_| PickleError::Malformed("non-UTF-8 text line".into()))?;
        self.at += end + 1;
        Ok(line)
    }
    fn len(&mut self, n: u64) -> Result<usize> {
        let n = usize::try_from(n).map_err(|_| PickleError::Truncated)?;
        if n > self.bytes.len() - self.at.min(self.bytes.len()) {
            return Err(PickleError::Truncated);
        }
        Ok(n)
    }
}

fn utf8(bytes: &[u8]) -> Result<Rc<str>> {
    std::str::from_utf8(bytes)
        .map(Rc::from)
        .map_err(|_| PickleError::Malformed("invalid UTF-8 string".into()))
}

impl Machine {
    /// A machine that refuses a pickle creating more than `max_objects`
    /// objects (at most [`MAX_OBJECTS`]).
    pub fn with_max_objects(max_objects: usize) -> Self {
        Self { max_objects: Some(max_objects.min(MAX_OBJECTS)), ..Self::default() }
    }

    /// Runs the pickle in `bytes` and returns what `STOP` left on the stack.
    pub fn run(&mut self, bytes: &[u8]) -> Result<Value> {
        self.run_from(bytes, 0).map(|(value, _)| value)
    }

    /// Runs the pickle that starts at `start` in `bytes` (a stream of several,
    /// as the legacy `torch.save` format writes), each with a memo and stack of
    /// its own as `pickle.load` would; returns its value and where it ended.
    pub fn run_from(&mut self, bytes: &[u8], start: usize) -> Result<(Value, usize)> {
        self.stack.clear();
        self.marks.clear();
        self.memo = Memo::default();
        self.dict_keys.clear();
        let mut r = Reader { bytes, at: start };
        for _ in 0..MAX_OPS {
            let at = r.at;
            let op = r.byte()?;
            match op {
                0x80 => {
                    r.byte()?; // PROTO
                }
                0x95 => {
                    r.u64()?; // FRAME: a length hint
                }
                b'.' => {
                    // STOP: no dict of this pickle is written again, and
                    // nothing is fetched from its memo.
                    self.dict_keys = HashMap::new();
                    self.memo = Memo::default();
                    return Ok((self.pop()?, r.at));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = r.u32()? as i32;
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = r.byte()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = r.u16()?;
                    self.push(Value::Int(v.into()))?
                }
                b'I' => {
                    let line = r.line()?;
                    let v = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(
                            line.parse().map_err(|_| PickleError::Malformed(format!("INT {line:?}")))?,
                        ),
                    };
                    self.push(v)?
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement.
                    let n = if op == 0x8a { r.byte()? as u64 } else { r.u32()? as u64 };
                    let n = r.len(n)?;
                    let digits = r.take(n)?;
                    let v = if n == 0 {
                        Value::Int(0)
                    } else if n <= 8 {
                        let negative = digits[n - 1] & 0x80 != 0;
                        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
                        buf[..n].copy_from_slice(digits);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt
                    };
                    self.push(v)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(r.take(8)?.try_into().map_err(|_| PickleError::Truncated)?);
                    self.push(Value::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => r.u32()? as u64,
                        0x8c => r.byte()? as u64,
                        _ => r.u64()?,
                    };
                    let n = r.len(n)?;
                    let s = utf8(r.take(n)?)?;
                    self.push(Value::Str(s))?
                }
                b'U' | b'T' => {
                    // SHORT_BINSTRING / BINSTRING: Python 2 str, read as text.
                    let n = if op == b'U' { r.byte()? as u64 } else { r.u32()? as u64 };
                    let n = r.len(n)?;
                    let s = String::from_utf8_lossy(r.take(n)?).into_owned();
                    self.push(Value::Str(s.into()))?
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => r.byte()? as u64,
                        b'B' => r.u32()? as u64,
                        _ => r.u64()?,
                    };
                    let n = r.len(n)?;
                    let b: Rc<[u8]> = Rc::from(r.take(n)?);
                    self.push(Value::Bytes(b))?
                }
                b'}' => self.push_object(Object::Dict(Vec::new(), Vec::new()))?,
                b']' => self.push_object(Object::List(Vec::new()))?,
                b')' => self.push_object(Object::Tuple(Vec::new()))?,
                0x8f => self.push_object(Object::Set(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs_of(items)?;
                    self.push_object(Object::Dict(Vec::new(), Vec::new()))?;
                    let dict = self.stack.last().cloned().unwrap_or(Value::None);
                    self.set_items(&dict, pairs)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_object(Object::List(items))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_object(Object::Tuple(items))?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_object(Object::Set(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(PickleError::Malformed(
                            "tuple of more items than the stack holds".into(),
                        ));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_object(Object::Tuple(items))?
                }
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => r.byte()? as u32,
                        b'r' => r.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let top = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("PUT on an empty stack".into()))?;
                    if self.memo.len() >= MAX_OBJECTS {
                        return Err(PickleError::TooLarge("too many memoised values".into()));
                    }
                    self.memo.insert(key, top);
                }
                b'h' | b'j' => {
                    let key = if op == b'h' { r.byte()? as u32 } else { r.u32()? };
                    let v = self
                        .memo
                        .get(key)
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed(format!("GET of unknown memo {key}")))?;
                    self.push(v)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("DUP on an empty stack".into()))?;
                    self.push(top)?
                }
                b'c' => {
                    let module = r.line()?.to_string();
                    let name = r.line()?.to_string();
                    let value = global(&module, &name)?;
                    self.globals.insert((module, name));
                    self.push(value)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let value = global(&m, &n)?;
                            self.globals.insert((m.to_string(), n.to_string()));
                            self.push(value)?
                        }
                        _ => return Err(PickleError::Malformed("STACK_GLOBAL needs two strings".into())),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    match &callable {
                        // OrderedDict() is a dict that SETITEMS then fills.
                        Value::Global(m, n) if &**m == "collections" && &**n == "OrderedDict" => {
                            self.push_object(Object::Dict(Vec::new(), Vec::new()))?
                        }
                        Value::Global(..) | Value::Inert(..) => {
                            self.push_object(Object::Reduce { callable, args, state: None })?
                        }
                        _ => return Err(PickleError::Malformed("REDUCE of something not a global".into())),
                    }
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push_object(Object::Reduce { callable, args, state: None })?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("BUILD on an empty stack".into()))?;
                    self.build(target, state)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.persistent.push(pid);
                    self.push(Value::Persistent(self.persistent.len() - 1))?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("SETITEM on an empty stack".into()))?;
                    self.set_items(&dict, vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("SETITEMS on an empty stack".into()))?;
                    let pairs = pairs_of(items)?;
                    self.set_items(&dict, pairs)?;
                }
                b'a' => {
                    let value = self.pop()?;
                    let list = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("APPEND on an empty stack".into()))?;
                    self.list_mut(&list)?.push(value);
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let list = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| PickleError::Malformed("APPENDS on an empty stack".into()))?;
                    self.list_mut(&list)?.extend(items);
                }
                other => return Err(PickleError::UnknownOpcode(other, at)),
            }
        }
        Err(PickleError::TooLarge(format!("more than {MAX_OPS} operations")))
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(PickleError::TooLarge(format!("stack deeper than {MAX_STACK}")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn push_object(&mut self, o: Object) -> Result<()> {
        let max = self.max_objects.unwrap_or(MAX_OBJECTS);
        if self.objects.len() >= max {
            return Err(PickleError::TooLarge(format!("more than {max} objects")));
        }
        self.objects.push(o);
        self.push(Value::Ref(self.objects.len() - 1))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(PickleError::Malformed("pop across a MARK".into()));
        }
        self.stack.pop().ok_or_else(|| PickleError::Malformed("pop from an empty stack".into()))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().ok_or_else(|| PickleError::Malformed("no MARK to pop to".into()))?;
        if mark > self.stack.len() {
            return Err(PickleError::Malformed("MARK above the stack".into()));
        }
        Ok(self.stack.split_off(mark))
    }

    fn object_mut(&mut self, v: &Value) -> Result<&mut Object> {
        match v {
            Value::Ref(i) => {
                self.objects.get_mut(*i).ok_or_else(|| PickleError::Malformed("dangling reference".into()))
            }
            other => Err(PickleError::Malformed(format!("expected a container, found {other:?}"))),
        }
    }

    /// `dict[key] = value` for each pair, as Python does it: a key already
    /// there keeps its place and takes the new value.
    fn set_items(&mut self, dict: &Value, pairs: Vec<(Value, Value)>) -> Result<()> {
        let Value::Ref(index) = *dict else {
            return Err(PickleError::Malformed("SETITEM on something not a dict".into()));
        };
        let Some(Object::Dict(items, _)) = self.objects.get_mut(index) else {
            return Err(PickleError::Malformed("SETITEM on something not a dict".into()));
        };
        let places = self.dict_keys.entry(index).or_default();
        for (key, value) in pairs {
            match DictKey::of(&key) {
                Some(k) => match places.get(&k) {
                    Some(&at) => items[at].1 = value,
                    None => {
                        places.insert(k, items.len());
                        items.push((key, value));
                    }
                },
                None => items.push((key, value)),
            }
        }
        Ok(())
    }

    fn list_mut(&mut self, v: &Value) -> Result<&mut Vec<Value>> {
        match self.object_mut(v)? {
            Object::List(items) | Object::Set(items) => Ok(items),
            _ => Err(PickleError::Malformed("APPEND on something not a list".into())),
        }
    }

    fn build(&mut self, target: Value, state: Value) -> Result<()> {
        // A dict's BUILD (OrderedDict's `_metadata`) sets attributes from a dict.
        let attributes = match &state {
            Value::Ref(i) => match self.objects.get(*i) {
                Some(Object::Dict(items, _)) => items.clone(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        match self.object_mut(&target)? {
            Object::Dict(_, attrs) => attrs.extend(attributes),
            Object::Reduce { state: slot, .. } => *slot = Some(state),
            _ => {}
        }
        Ok(())
    }
}

fn global(module: &str, name: &str) -> Result<Value> {
    match admission(module, name) {
        Admission::Allowed => Ok(Value::Global(module.into(), name.into())),
        Admission::Inert => Ok(Value::Inert(module.into(), name.into())),
        Admission::Refused => Err(PickleError::ForbiddenGlobal(format!("{module}.{name}"))),
    }
}

fn pairs_of(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        return Err(PickleError::Malformed("odd number of items for a dict".into()));
    }
    let mut pairs = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        pairs.push((k, v));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and arena slots are made per tensor: their size is memory per tensor.
    #[test]
    fn values_are_small() {
        assert!(std::mem::size_of::<Value>() <= 24, "Value is {} bytes", std::mem::size_of::<Value>());
        assert!(std::mem::size_of::<Object>() <= 80, "Object is {} bytes", std::mem::size_of::<Object>());
    }

    /// Memo keys in the picklers' order, out of order, and set twice all read back.
    #[test]
    fn the_memo_reads_back_keys_in_any_order() {
        // 'a' PUT 0, 'b' PUT 1, 'c' PUT 5 (out of order), 'd' PUT 1 again;
        // then GET 0, 1, 5 into a tuple.
        let mut p = vec![0x80, 2, b'('];
        for (s, key) in [(b'a', 0u8), (b'b', 1), (b'c', 5), (b'd', 1)] {
            p.extend_from_slice(&[0x8c, 1, s, b'q', key, b'0']);
        }
        p.extend_from_slice(&[b'h', 0, b'h', 1, b'h', 5, b't', b'.']);
        let mut machine = Machine::default();
        let root = machine.run(&p).unwrap();
        let Value::Ref(i) = root else { panic!("not a tuple: {root:?}") };
        let text = |v: &Value| match v {
            Value::Str(s) => s.to_string(),
            other => panic!("{other:?}"),
        };
        let Object::Tuple(items) = &machine.objects[i] else { panic!() };
        assert_eq!(items.iter().map(text).collect::<Vec<_>>(), ["a", "d", "c"]);
        // A GET of a key never PUT is refused.
        let mut bad = vec![0x80, 2, 0x8c, 1, b'a', b'q', 0, b'h', 3, b'.'];
        assert!(Machine::default().run(&bad).is_err());
        bad[8] = 0;
        assert!(Machine::default().run(&bad).is_ok());
    }
}
