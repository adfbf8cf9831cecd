//! Reading diffusers/transformers `config.json` files with errors that name the key, the value
//! found and what is allowed.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::read_json;

/// A parsed JSON config and the path it came from, for error messages.
pub struct ConfigReader {
    path: PathBuf,
    value: Value,
}

impl ConfigReader {
    pub fn open(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        if !value.is_object() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                key: "(root)".into(),
                reason: "must be a JSON object".into(),
            });
        }
        Ok(ConfigReader {
            path: path.to_path_buf(),
            value,
        })
    }

    pub fn from_value(path: &Path, value: Value) -> Self {
        ConfigReader {
            path: path.to_path_buf(),
            value,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// The value of `key`, treating JSON `null` as absent.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.error(key, format!("must be a non-negative integer, found {v}"))
            }),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.raw(key).map(|_| self.usize_or(key, 0)).transpose()
    }

    /// An optional value named by a string: `parse` turns the name into the value; anything else
    /// is an error listing `allowed`.
    pub fn opt_named<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Option<T>,
        allowed: &str,
    ) -> Result<Option<T>> {
        self.raw(key)
            .map(|v| {
                v.as_str()
                    .and_then(&parse)
                    .ok_or_else(|| self.error(key, format!("is {v}; allowed: {allowed}")))
            })
            .transpose()
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.error(key, format!("must be a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(key, format!("must be true or false, found {v}"))),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.error(key, format!("must be a string, found {v}"))),
        }
    }

    pub fn usize_list_or(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.raw(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().map(|x| x as usize).ok_or_else(|| {
                        self.error(
                            key,
                            format!("must be a list of non-negative integers, found {v}"),
                        )
                    })
                })
                .collect(),
            Some(v) => Err(self.error(key, format!("must be a list, found {v}"))),
        }
    }

    /// Check `_class_name`, when present, against the classes this code implements.
    pub fn expect_class(&self, allowed: &[&str]) -> Result<()> {
        match self.raw("_class_name") {
            None => Ok(()),
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
            Some(v) => Err(self.error(
                "_class_name",
                format!("{v} is not supported; allowed: {}", allowed.join(", ")),
            )),
        }
    }
}
