//! Aligned text tables in the style of `kubectl get`: upper-case headers, columns padded to their
//! widest cell and separated by three spaces.

use std::fmt;

/// A table of string cells.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty, extra ones are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows as JSON objects keyed by lower-case header.
    pub fn to_json(&self) -> serde_json::Value {
        self.rows
            .iter()
            .map(|row| {
                self.headers
                    .iter()
                    .zip(row)
                    .map(|(h, c)| (h.to_lowercase(), serde_json::Value::from(c.clone())))
                    .collect::<serde_json::Map<_, _>>()
            })
            .collect()
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cell =
            |row: &[String], i: usize| row.get(i).map(String::as_str).unwrap_or("").to_owned();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain([self.headers[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |f: &mut fmt::Formatter<'_>, cells: Vec<String>| {
            let last = cells.len().saturating_sub(1);
            let mut text = String::new();
            for (i, c) in cells.iter().enumerate() {
                text.push_str(c);
                if i < last {
                    let pad = widths[i] - c.chars().count() + 3;
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(f, "{text}")
        };
        line(f, self.headers.clone())?;
        for row in &self.rows {
            line(f, (0..self.headers.len()).map(|i| cell(row, i)).collect())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_headers() {
        let mut t = Table::new(&["NAME", "BACKLOG"]);
        t.row(vec!["orders".into(), "12".into()]);
        t.row(vec!["a".into(), "3456".into()]);
        assert_eq!(
            t.to_string(),
            "NAME     BACKLOG\norders   12\na        3456\n"
        );
        assert_eq!(t.to_json()[1]["backlog"], "3456");
    }
}
