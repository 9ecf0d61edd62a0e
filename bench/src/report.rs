//! Output of the side-by-side suites: one JSON object per measured configuration (`--json`,
//! one per line, for scripts and CI) or one readable line per configuration.

use serde_json::Value;

use crate::measure::{Spread, ratio, round4};

/// Where a suite's results go.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub json: bool,
}

impl Report {
    /// Prints one configuration's figures.
    pub fn emit(&self, record: &Record) {
        if self.json {
            println!("{}", record.to_json());
        } else {
            let line: Vec<String> = record
                .fields
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            println!("{}", line.join(" "));
        }
    }

    /// A progress note; on stderr so that `--json` output stays one object per line.
    pub fn note(&self, text: &str) {
        eprintln!("[bench] {text}");
    }
}

/// The figures of one configuration, in insertion order (suite and configuration first, then
/// figures), so that a person can read the JSON lines too.
#[derive(Debug, Clone, Default)]
pub struct Record {
    fields: Vec<(String, Value)>,
}

impl Record {
    pub fn new(suite: &str) -> Record {
        let mut r = Record::default();
        r.set("suite", suite);
        r
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Record {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.fields.push((key.to_string(), value)),
        }
        self
    }

    /// One JSON object, fields in insertion order.
    pub fn to_json(&self) -> String {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    /// A figure rounded to 4 significant digits (`null` when not finite).
    pub fn num(&mut self, key: &str, value: f64) -> &mut Record {
        let v = if value.is_finite() {
            Value::from(round4(value))
        } else {
            Value::Null
        };
        self.set(key, v)
    }

    /// `<name>` = median, `<name>_min`, `<name>_max`.
    pub fn spread(&mut self, name: &str, spread: Option<Spread>) -> &mut Record {
        match spread {
            Some(s) => {
                self.num(name, s.median);
                self.num(&format!("{name}_min"), s.min);
                self.num(&format!("{name}_max"), s.max)
            }
            None => {
                self.set(name, Value::Null);
                self.set(&format!("{name}_min"), Value::Null);
                self.set(&format!("{name}_max"), Value::Null)
            }
        }
    }

    /// `key` = a / b of two medians, or `null`.
    pub fn ratio(&mut self, key: &str, a: Option<Spread>, b: Option<Spread>) -> &mut Record {
        let r = a.zip(b).and_then(|(a, b)| ratio(a.median, b.median));
        match r {
            Some(r) => self.num(key, r),
            None => self.set(key, Value::Null),
        }
    }

    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_order_and_round() {
        let mut r = Record::new("lookup");
        r.set("dim", 16).num("x", 1234.5678);
        r.spread("keys_per_s", Spread::of(&[1.0, 2.0, 3.0]));
        r.ratio("ratio", Spread::of(&[10.0]), Spread::of(&[4.0]));
        r.ratio("none", Spread::of(&[1.0]), Spread::of(&[0.0]));
        assert_eq!(r.fields[0].0, "suite");
        let parsed: serde_json::Value = serde_json::from_str(&r.to_json()).expect("valid JSON");
        assert_eq!(parsed["dim"], 16);
        assert_eq!(parsed["keys_per_s_min"], 1.0);
        assert_eq!(r.get("x"), Some(&Value::from(1235.0)));
        assert_eq!(r.get("keys_per_s_max"), Some(&Value::from(3.0)));
        assert_eq!(r.get("ratio"), Some(&Value::from(2.5)));
        assert_eq!(r.get("none"), Some(&Value::Null));
    }
}
