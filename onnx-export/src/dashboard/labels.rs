//! Auto labels: the whole words carrying most of a feature's top activations.

use std::collections::HashMap;

use super::model::*;

pub(super) fn is_special(w: &str) -> bool {
    let bracketed = |open: char, close: char| {
        w.len() > 2 && w.starts_with(open) && w.ends_with(close) && !w[1..w.len() - 1].contains(' ')
    };
    w.is_empty() || bracketed('[', ']') || bracketed('<', '>')
}

pub(super) fn is_punctuation(w: &str) -> bool {
    !w.chars().any(char::is_alphanumeric)
}

/// The whole word around token `j`: a WordPiece word is its first piece and the `##` pieces after.
pub(super) fn whole_word(tokens: &[String], j: usize) -> String {
    let mut s = j;
    while s > 0 && tokens[s].starts_with("##") {
        s -= 1;
    }
    let mut e = j + 1;
    while e < tokens.len() && tokens[e].starts_with("##") {
        e += 1;
    }
    tokens[s..e]
        .iter()
        .map(|t| t.strip_prefix("##").unwrap_or(t))
        .collect()
}

pub(super) fn choose_label(weights: &HashMap<String, f64>) -> Vec<LabelWord> {
    let total: f64 = weights.values().sum();
    if total <= 0.0 {
        return Vec::new();
    }
    let mut all: Vec<(&String, f64)> = weights.iter().map(|(w, v)| (w, *v)).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let best = all[0].1;
    let good: Vec<(&String, f64)> = all
        .iter()
        .copied()
        .filter(|(w, v)| !is_special(w) && !is_punctuation(w) && *v >= 0.1 * best)
        .collect();
    let chosen = if good.is_empty() { all } else { good };
    chosen
        .into_iter()
        .take(3)
        .map(|(w, v)| LabelWord {
            word: w.clone(),
            share: v / total,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_join_pieces() {
        let t: Vec<String> = ["the", "copy", "##right", "##s", "holder"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(whole_word(&t, 1), "copyrights");
        assert_eq!(whole_word(&t, 2), "copyrights");
        assert_eq!(whole_word(&t, 3), "copyrights");
        assert_eq!(whole_word(&t, 4), "holder");
    }

    #[test]
    fn labels_skip_punctuation_when_words_carry_weight() {
        let mut w = HashMap::new();
        w.insert(",".to_string(), 5.0);
        w.insert("[CLS]".to_string(), 4.0);
        w.insert("license".to_string(), 2.0);
        w.insert("copyright".to_string(), 3.0);
        let l = choose_label(&w);
        let words: Vec<&str> = l.iter().map(|w| w.word.as_str()).collect();
        assert_eq!(words, ["copyright", "license"]);
        let mut p = HashMap::new();
        p.insert(".".to_string(), 5.0);
        assert_eq!(choose_label(&p)[0].word, ".");
    }
}
