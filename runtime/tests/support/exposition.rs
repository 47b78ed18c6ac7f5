//! Reading the Prometheus text exposition in tests. Include it with
//! `#[path = "support/exposition.rs"] mod exposition;`.

/// One value of the text exposition: the sample `name{...}` whose labels include all of `labels`
/// (each a `key="value"` string).
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
