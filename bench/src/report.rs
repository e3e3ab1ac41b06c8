//! The Markdown report: a document built section by section, and tables.

use std::fmt::Write as _;

/// A Markdown table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are left empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        let mut r: Vec<String> = cells.into_iter().map(|c| escape_cell(&c.into())).collect();
        r.resize(self.header.len(), String::new());
        self.rows.push(r);
        self
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table in Markdown, ending with a newline.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        out.push_str(&line(
            &self
                .header
                .iter()
                .map(|_| "---".to_owned())
                .collect::<Vec<_>>(),
        ));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// A table cell: pipes escaped, newlines flattened.
fn escape_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A Markdown document under construction.
#[derive(Debug, Clone, Default)]
pub struct Report {
    out: String,
}

impl Report {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// A heading of `level` (1–6).
    pub fn heading(&mut self, level: usize, text: &str) -> &mut Self {
        self.blank();
        let _ = writeln!(self.out, "{} {text}", "#".repeat(level.clamp(1, 6)));
        self.out.push('\n');
        self
    }

    /// A paragraph.
    pub fn para(&mut self, text: &str) -> &mut Self {
        self.blank();
        let _ = writeln!(self.out, "{text}");
        self.out.push('\n');
        self
    }

    /// One bullet (consecutive bullets form a list).
    pub fn bullet(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.out, "- {text}");
        self
    }

    /// A table.
    pub fn table(&mut self, t: &Table) -> &mut Self {
        self.blank();
        self.out.push_str(&t.render());
        self.out.push('\n');
        self
    }

    /// A fenced code block.
    pub fn code(&mut self, text: &str) -> &mut Self {
        self.blank();
        let _ = writeln!(self.out, "```\n{}\n```", text.trim_end());
        self.out.push('\n');
        self
    }

    /// Ensures the document ends with an empty line (or is empty).
    fn blank(&mut self) {
        if !self.out.is_empty() && !self.out.ends_with("\n\n") {
            if !self.out.ends_with('\n') {
                self.out.push('\n');
            }
            self.out.push('\n');
        }
    }

    /// The document.
    pub fn finish(&self) -> String {
        let mut s = self.out.trim_end().to_owned();
        s.push('\n');
        s
    }
}

/// The paragraph of a part of a benchmark that failed: `**<what> FAILED:**` and the error
/// chain in a code block.
pub fn failed(r: &mut Report, what: &str, e: &anyhow::Error) {
    r.para(&format!("**{what} FAILED:**"));
    r.code(&format!("{e:#}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new(["a", "b"]);
        assert!(t.is_empty());
        t.row(["1", "x|y"]).row(["2"]).row(["3", "4", "dropped"]);
        assert_eq!(
            t.render(),
            "| a | b |\n| --- | --- |\n| 1 | x\\|y |\n| 2 |  |\n| 3 | 4 |\n"
        );
    }

    #[test]
    fn documents_separate_blocks_with_one_blank_line() {
        let mut r = Report::new();
        r.heading(1, "Title")
            .bullet("one")
            .bullet("two")
            .para("text");
        let mut t = Table::new(["k"]);
        t.row(["v"]);
        r.table(&t).code("cmd --flag\n");
        assert_eq!(
            r.finish(),
            "# Title\n\n- one\n- two\n\ntext\n\n| k |\n| --- |\n| v |\n\n```\ncmd --flag\n```\n"
        );
    }
}
