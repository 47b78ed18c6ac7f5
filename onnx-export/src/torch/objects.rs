//! The objects the pickle builds: allow-listed globals, storages and tensors, and the calls that
//! rebuild them.

use std::cell::RefCell;
use std::rc::Rc;

use super::dtype::*;
use super::limits::*;

/// Errors of the pickle machine, turned into format errors naming the file by the caller.
pub(super) type PResult<T> = std::result::Result<T, String>;

/// An allow-listed global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// A storage class; `None` for `torch.UntypedStorage` (bytes).
    StorageType(Option<Dtype>),
    Dtype(Dtype),
    TensorType,
    ParameterType,
}

impl Global {
    /// Resolves `module.name`, or says why not.
    pub(super) fn resolve(module: &str, name: &str) -> std::result::Result<Self, String> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromTypeV2,
            ("torch", "UntypedStorage") => Self::StorageType(None),
            ("torch", "Tensor") => Self::TensorType,
            ("torch.nn.parameter", "Parameter") => Self::ParameterType,
            ("torch", n) => {
                if let Some(d) = Dtype::from_storage(n) {
                    Self::StorageType(Some(d))
                } else if let Some(d) = Dtype::from_dtype(n) {
                    Self::Dtype(d)
                } else {
                    return Err(refusal(module, name));
                }
            }
            _ => return Err(refusal(module, name)),
        };
        Ok(g)
    }

    pub(super) fn name(self) -> String {
        match self {
            Self::OrderedDict => "collections.OrderedDict".into(),
            Self::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Self::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Self::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3".into(),
            Self::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Self::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state".into(),
            Self::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2".into(),
            Self::StorageType(None) => "torch.UntypedStorage".into(),
            Self::StorageType(Some(d)) => format!("{} storage", d.name()),
            Self::Dtype(d) => d.name().into(),
            Self::TensorType => "torch.Tensor".into(),
            Self::ParameterType => "torch.nn.parameter.Parameter".into(),
        }
    }
}

pub(super) fn refusal(module: &str, name: &str) -> String {
    format!("refuses to load `{module}.{name}`: only tensors and plain values are read")
}

/// A storage named by a persistent id.
#[derive(Debug, Clone)]
pub(super) struct StorageRef {
    pub(super) key: String,
    /// `None` for an untyped (byte) storage.
    pub(super) dtype: Option<Dtype>,
    /// Elements (bytes when untyped).
    pub(super) numel: u64,
}

impl StorageRef {
    pub(super) fn elem_size(&self) -> usize {
        self.dtype.map_or(1, Dtype::size)
    }
}

/// A tensor: a strided view of a storage.
#[derive(Debug, Clone)]
pub(super) struct TensorRef {
    pub(super) storage: StorageRef,
    pub(super) dtype: Dtype,
    /// In elements of `dtype`.
    pub(super) offset: u64,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<u64>,
    pub(super) numel: u64,
}

/// An unpickled object. Containers are shared, as in Python: the memo and the stack hold the same
/// list, so appending through one is seen through the other.
#[derive(Debug, Clone)]
pub(super) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    List(Rc<RefCell<Vec<Obj>>>),
    Tuple(Rc<[Obj]>),
    Dict(Rc<RefCell<Vec<(Obj, Obj)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Obj {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Bool(_) => "a bool",
            Self::Int(_) => "an int",
            Self::Float(_) => "a float",
            Self::Str(_) => "a string",
            Self::Bytes(_) => "bytes",
            Self::List(_) => "a list",
            Self::Tuple(_) => "a tuple",
            Self::Dict(_) => "a dict",
            Self::Global(_) => "a global",
            Self::Storage(_) => "a storage",
            Self::Tensor(_) => "a tensor",
        }
    }

    pub(super) fn list(v: Vec<Obj>) -> Self {
        Self::List(Rc::new(RefCell::new(v)))
    }

    pub(super) fn int(&self, what: &str) -> std::result::Result<i64, String> {
        match self {
            Self::Int(i) => Ok(*i),
            Self::Bool(b) => Ok(i64::from(*b)),
            other => Err(format!("{what} is {}, not an int", other.kind())),
        }
    }

    /// The items of a tuple or list.
    pub(super) fn items(&self, what: &str) -> std::result::Result<Vec<Obj>, String> {
        match self {
            Self::Tuple(t) => Ok(t.to_vec()),
            Self::List(l) => Ok(l.borrow().clone()),
            other => Err(format!("{what} is {}, not a tuple", other.kind())),
        }
    }
}

/// `('storage', torch.FloatStorage, key, location, numel)`.
pub(super) fn persistent_storage(pid: &Obj) -> PResult<Obj> {
    let items = pid.items("a persistent id")?;
    let [tag, ty, key, _location, numel] = items.as_slice() else {
        return Err(format!(
            "a persistent id has {} fields, not torch.save's 5",
            items.len()
        ));
    };
    if !matches!(tag, Obj::Str(s) if &**s == "storage") {
        return Err("a persistent id that is not a storage".into());
    }
    let Obj::Global(Global::StorageType(dtype)) = ty else {
        return Err(format!("a storage whose type is {}", ty.kind()));
    };
    let Obj::Str(key) = key else {
        return Err(format!("a storage key that is {}", key.kind()));
    };
    if key.is_empty()
        || key.len() > 64
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!("storage key `{key}` is not a plain name"));
    }
    let numel = numel.int("a storage's element count")?;
    let numel =
        u64::try_from(numel).map_err(|_| format!("storage `{key}` has {numel} elements"))?;
    Ok(Obj::Storage(Rc::new(StorageRef {
        key: key.to_string(),
        dtype: *dtype,
        numel,
    })))
}

/// Applies an allow-listed function.
pub(super) fn call(func: &Obj, args: &Obj) -> PResult<Obj> {
    let g = match func {
        Obj::Global(g) => *g,
        other => return Err(format!("REDUCE calls {}, not a function", other.kind())),
    };
    let a = args.items("call arguments")?;
    match g {
        Global::OrderedDict => {
            let mut d = Vec::new();
            if let Some(init) = a.first() {
                for p in init.items("OrderedDict's argument")? {
                    let kv = p.items("an OrderedDict item")?;
                    let [k, v] = kv.as_slice() else {
                        return Err("an OrderedDict item is not a pair".into());
                    };
                    d.push((k.clone(), v.clone()));
                }
            }
            Ok(Obj::Dict(Rc::new(RefCell::new(d))))
        }
        Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
            rebuild_tensor(g, &a)
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match a.first() {
            Some(t @ Obj::Tensor(_)) => Ok(t.clone()),
            _ => Err(format!("`{}` without a tensor", g.name())),
        },
        Global::RebuildFromTypeV2 => {
            let [f, ty, inner, ..] = a.as_slice() else {
                return Err("`torch._tensor._rebuild_from_type_v2` with too few arguments".into());
            };
            if !matches!(ty, Obj::Global(Global::TensorType | Global::ParameterType)) {
                return Err("`torch._tensor._rebuild_from_type_v2` of a tensor subclass".into());
            }
            match f {
                Obj::Global(
                    Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3,
                ) => call(f, inner),
                _ => Err("`torch._tensor._rebuild_from_type_v2` with another function".into()),
            }
        }
        other => Err(format!(
            "refuses to call `{}`: only tensor rebuilds and OrderedDict are applied",
            other.name()
        )),
    }
}

/// `_rebuild_tensor(storage, offset, size, stride)`, `_v2(…, requires_grad, hooks[, metadata])`,
/// `_v3(…, requires_grad, hooks, dtype[, metadata])`.
pub(super) fn rebuild_tensor(g: Global, a: &[Obj]) -> PResult<Obj> {
    let name = g.name();
    if a.len() < 4 {
        return Err(format!("`{name}` with {} arguments", a.len()));
    }
    let Obj::Storage(storage) = &a[0] else {
        return Err(format!("`{name}` of {}, not a storage", a[0].kind()));
    };
    let offset = a[1].int("a storage offset")?;
    let offset =
        u64::try_from(offset).map_err(|_| format!("a negative storage offset {offset}"))?;
    let dims = |o: &Obj, what: &str| -> PResult<Vec<u64>> {
        let items = o.items(what)?;
        if items.len() > MAX_DIMS {
            return Err(format!("{what} has {} dimensions", items.len()));
        }
        items
            .iter()
            .map(|i| {
                let v = i.int(what)?;
                u64::try_from(v).map_err(|_| format!("{what} has a negative entry {v}"))
            })
            .collect()
    };
    let shape = dims(&a[2], "a tensor's size")?;
    let stride = dims(&a[3], "a tensor's stride")?;
    if shape.len() != stride.len() {
        return Err(format!("a tensor of size {shape:?} has stride {stride:?}"));
    }
    let metadata = match g {
        Global::RebuildTensorV2 => a.get(6),
        Global::RebuildTensorV3 => a.get(7),
        _ => None,
    };
    if let Some(Obj::Dict(d)) = metadata
        && d.borrow()
            .iter()
            .any(|(_, v)| !matches!(v, Obj::Bool(false) | Obj::None))
    {
        return Err("a tensor with its conjugate or negative bit set".into());
    }
    let dtype = if g == Global::RebuildTensorV3 {
        match a.get(6) {
            Some(Obj::Global(Global::Dtype(d))) => *d,
            Some(o) => return Err(format!("`{name}` with a dtype that is {}", o.kind())),
            None => return Err(format!("`{name}` without its dtype")),
        }
    } else {
        storage
            .dtype
            .ok_or_else(|| format!("`{name}` of an untyped storage"))?
    };
    if storage.dtype.is_some_and(|d| d != dtype) {
        return Err(format!(
            "a {} tensor of a {} storage",
            dtype.name(),
            storage.dtype.map_or("byte", Dtype::name)
        ));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("a tensor of size {shape:?} has too many elements"))?;
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("size {d} does not fit")))
        .collect::<PResult<Vec<usize>>>()?;
    Ok(Obj::Tensor(Rc::new(TensorRef {
        storage: storage.as_ref().clone(),
        dtype,
        offset,
        shape,
        stride,
        numel,
    })))
}
