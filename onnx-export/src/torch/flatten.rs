//! Flattening an unpickled object into named tensors and a JSON config.

use std::collections::BTreeMap;

use serde_json::Value;

use super::limits::*;
use super::objects::*;

#[derive(Default)]
pub(super) struct Flat {
    pub(super) tensors: BTreeMap<String, TensorRef>,
    pub(super) values: BTreeMap<String, Value>,
}

pub(super) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

pub(super) fn spend(budget: &mut u64) -> PResult<()> {
    *budget = budget
        .checked_sub(1)
        .ok_or("the unpickled object is too large to flatten (shared references?)")?;
    Ok(())
}

impl Flat {
    pub(super) fn add(
        &mut self,
        o: &Obj,
        name: String,
        depth: usize,
        budget: &mut u64,
    ) -> PResult<()> {
        spend(budget)?;
        if depth > MAX_DEPTH {
            let shown: String = name.chars().take(60).collect();
            return Err(format!(
                "`{shown}…` is nested more than {MAX_DEPTH} deep (or refers to itself)"
            ));
        }
        match o {
            Obj::Dict(d) => {
                for (k, v) in d.borrow().iter() {
                    let key = match k {
                        Obj::Str(s) => s.to_string(),
                        Obj::Int(i) => i.to_string(),
                        Obj::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                        Obj::None => "None".to_string(),
                        other => {
                            return Err(format!(
                                "a key of `{name}` is {}, not a string or int",
                                other.kind()
                            ));
                        }
                    };
                    self.add(v, join(&name, &key), depth + 1, budget)?;
                }
            }
            Obj::List(_) | Obj::Tuple(_) if holds_tensor(o, depth, budget)? => {
                let items = o.items("")?;
                for (i, v) in items.iter().enumerate() {
                    self.add(v, join(&name, &i.to_string()), depth + 1, budget)?;
                }
            }
            Obj::Tensor(t) => {
                self.values.remove(&name);
                self.tensors.insert(name, t.as_ref().clone());
            }
            // A storage not wrapped in a tensor carries no shape: nothing to name.
            Obj::Storage(_) => {}
            other => {
                let v = to_json(other, depth, budget)?;
                self.tensors.remove(&name);
                self.values.insert(name, v);
            }
        }
        Ok(())
    }
}

pub(super) fn holds_tensor(o: &Obj, depth: usize, budget: &mut u64) -> PResult<bool> {
    spend(budget)?;
    if depth > MAX_DEPTH {
        return Err(format!(
            "nested more than {MAX_DEPTH} deep (or refers to itself)"
        ));
    }
    Ok(match o {
        Obj::Tensor(_) => true,
        Obj::List(l) => {
            let mut any = false;
            for i in l.borrow().iter() {
                any |= holds_tensor(i, depth + 1, budget)?;
            }
            any
        }
        Obj::Tuple(t) => {
            let mut any = false;
            for i in t.iter() {
                any |= holds_tensor(i, depth + 1, budget)?;
            }
            any
        }
        Obj::Dict(d) => {
            let mut any = false;
            for (_, v) in d.borrow().iter() {
                any |= holds_tensor(v, depth + 1, budget)?;
            }
            any
        }
        _ => false,
    })
}

pub(super) fn to_json(o: &Obj, depth: usize, budget: &mut u64) -> PResult<Value> {
    spend(budget)?;
    if depth > MAX_DEPTH {
        return Err(format!(
            "nested more than {MAX_DEPTH} deep (or refers to itself)"
        ));
    }
    Ok(match o {
        Obj::None => Value::Null,
        Obj::Bool(b) => Value::Bool(*b),
        Obj::Int(i) => Value::from(*i),
        Obj::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None if f.is_nan() => Value::String("nan".into()),
            None if *f > 0.0 => Value::String("inf".into()),
            None => Value::String("-inf".into()),
        },
        Obj::Str(s) => Value::String(s.to_string()),
        Obj::Bytes(b) => Value::Array(b.iter().map(|&x| Value::from(x)).collect()),
        Obj::List(l) => Value::Array(
            l.borrow()
                .iter()
                .map(|i| to_json(i, depth + 1, budget))
                .collect::<PResult<_>>()?,
        ),
        Obj::Tuple(t) => Value::Array(
            t.iter()
                .map(|i| to_json(i, depth + 1, budget))
                .collect::<PResult<_>>()?,
        ),
        Obj::Dict(d) => {
            let mut m = serde_json::Map::new();
            for (k, v) in d.borrow().iter() {
                let key = match k {
                    Obj::Str(s) => s.to_string(),
                    Obj::Int(i) => i.to_string(),
                    other => return Err(format!("a dict key is {}", other.kind())),
                };
                m.insert(key, to_json(v, depth + 1, budget)?);
            }
            Value::Object(m)
        }
        Obj::Global(g) => Value::String(g.name()),
        Obj::Storage(_) | Obj::Tensor(_) => Value::Null,
    })
}
