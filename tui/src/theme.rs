//! Colours and glyphs: how many colours the terminal gets (`--color`, `NO_COLOR`) and whether
//! glyphs are Unicode or plain ASCII. Every state is a glyph plus a word, so nothing is said by
//! colour alone; colour only repeats what the text already says.

use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols;

/// How many colours to use. Over ssh `COLORTERM` is usually dropped, so `Auto` picks indexed
/// colours unless the terminal says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorMode {
    Never,
    Ansi16,
    Indexed256,
    TrueColor,
}

/// The `--color` argument: `auto` or a fixed mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorChoice {
    Auto,
    Fixed(ColorMode),
}

/// An unknown `--color` value.
#[derive(Debug, thiserror::Error)]
#[error("unknown colour mode {0:?}: expected auto, 16, 256, true or never")]
pub struct ColorChoiceError(String);

impl std::str::FromStr for ColorChoice {
    type Err = ColorChoiceError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "16" => Ok(Self::Fixed(ColorMode::Ansi16)),
            "256" => Ok(Self::Fixed(ColorMode::Indexed256)),
            "true" | "truecolor" | "24bit" => Ok(Self::Fixed(ColorMode::TrueColor)),
            "never" | "none" | "no" => Ok(Self::Fixed(ColorMode::Never)),
            other => Err(ColorChoiceError(other.to_string())),
        }
    }
}

impl ColorChoice {
    /// Resolves `auto` from the environment: `NO_COLOR` (any non-empty value) wins, then
    /// `COLORTERM`, then `TERM`. An explicit `--color` beats `NO_COLOR`, as no-color.org asks.
    pub fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> ColorMode {
        match self {
            Self::Fixed(mode) => mode,
            Self::Auto => {
                if env("NO_COLOR").is_some_and(|value| !value.is_empty()) {
                    return ColorMode::Never;
                }
                let colorterm = env("COLORTERM").unwrap_or_default();
                if colorterm == "truecolor" || colorterm == "24bit" {
                    return ColorMode::TrueColor;
                }
                let term = env("TERM").unwrap_or_default();
                if term == "dumb" {
                    ColorMode::Never
                } else if term.contains("256") {
                    ColorMode::Indexed256
                } else {
                    ColorMode::Ansi16
                }
            }
        }
    }
}

/// Whether the terminal can show Unicode glyphs; decided from the locale like most TUIs do.
pub fn unicode_from_locale(env: &dyn Fn(&str) -> Option<String>) -> bool {
    let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|name| env(name).filter(|value| !value.is_empty()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    locale.contains("utf-8") || locale.contains("utf8")
}

/// The styles and glyphs every screen draws with.
#[derive(Clone, Debug)]
pub struct Theme {
    pub mode: ColorMode,
    pub unicode: bool,
}

/// The meaning a style carries; the palette maps it to a colour per mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Ok,
    Info,
    Warn,
    Critical,
    Dim,
    Accent,
}

impl Theme {
    pub fn new(mode: ColorMode, unicode: bool) -> Self {
        Self { mode, unicode }
    }

    /// The style of a tone. Without colour, warnings and criticals are still bold so they stand
    /// out, and the text carries the meaning.
    pub fn tone(&self, tone: Tone) -> Style {
        let color = match (self.mode, tone) {
            (ColorMode::Never, _) => None,
            (_, Tone::Ok) => Some(self.pick(Color::Green, 71, (95, 175, 95))),
            (_, Tone::Info) => Some(self.pick(Color::Cyan, 74, (95, 175, 215))),
            (_, Tone::Warn) => Some(self.pick(Color::Yellow, 178, (215, 175, 0))),
            (_, Tone::Critical) => Some(self.pick(Color::Red, 160, (215, 0, 0))),
            (_, Tone::Dim) => Some(self.pick(Color::DarkGray, 244, (128, 128, 128))),
            (_, Tone::Accent) => Some(self.pick(Color::Blue, 33, (0, 135, 255))),
        };
        let style = color.map_or_else(Style::default, |color| Style::default().fg(color));
        match tone {
            Tone::Critical | Tone::Warn if self.mode == ColorMode::Never => {
                style.add_modifier(Modifier::BOLD)
            }
            Tone::Critical => style.add_modifier(Modifier::BOLD),
            _ => style,
        }
    }

    fn pick(&self, ansi: Color, indexed: u8, rgb: (u8, u8, u8)) -> Color {
        match self.mode {
            ColorMode::Ansi16 | ColorMode::Never => ansi,
            ColorMode::Indexed256 => Color::Indexed(indexed),
            ColorMode::TrueColor => Color::Rgb(rgb.0, rgb.1, rgb.2),
        }
    }

    /// The highlighted row or button: reverse video reads in every mode.
    pub fn selected(&self) -> Style {
        Style::default().add_modifier(Modifier::REVERSED)
    }

    pub fn title(&self) -> Style {
        Style::default().add_modifier(Modifier::BOLD)
    }

    pub fn border(&self) -> symbols::border::Set<'static> {
        if self.unicode {
            symbols::border::PLAIN
        } else {
            ASCII_BORDER
        }
    }

    pub fn bars(&self) -> symbols::bar::Set<'static> {
        if self.unicode {
            symbols::bar::NINE_LEVELS
        } else {
            ASCII_BARS
        }
    }

    /// A fill gauge `[#####-----]` of `width` cells including brackets.
    pub fn gauge(&self, fraction: f64, width: usize) -> String {
        let inner = width.saturating_sub(2);
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let filled = (fraction * inner as f64).round() as usize;
        let (full, empty, open, close) = if self.unicode {
            ("█", "░", "▕", "▏")
        } else {
            ("#", "-", "[", "]")
        };
        let mut gauge = String::with_capacity(width * 3);
        gauge.push_str(open);
        for _ in 0..filled {
            gauge.push_str(full);
        }
        for _ in filled..inner {
            gauge.push_str(empty);
        }
        gauge.push_str(close);
        gauge
    }

    /// Picks the Unicode or the ASCII form of a glyph.
    pub fn glyph(&self, unicode: &'static str, ascii: &'static str) -> &'static str {
        if self.unicode {
            unicode
        } else {
            ascii
        }
    }

    pub fn separator(&self) -> &'static str {
        self.glyph(" · ", " | ")
    }

    pub fn arrow_right(&self) -> &'static str {
        self.glyph("→", "->")
    }
}

const ASCII_BORDER: symbols::border::Set<'static> = symbols::border::Set {
    top_left: "+",
    top_right: "+",
    bottom_left: "+",
    bottom_right: "+",
    vertical_left: "|",
    vertical_right: "|",
    horizontal_top: "-",
    horizontal_bottom: "-",
};

const ASCII_BARS: symbols::bar::Set<'static> = symbols::bar::Set {
    full: "#",
    seven_eighths: "#",
    three_quarters: "=",
    five_eighths: "=",
    half: "-",
    three_eighths: "-",
    one_quarter: ".",
    one_eighth: ".",
    empty: " ",
};

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        }
    }

    #[test]
    fn no_color_wins_over_auto_but_not_over_an_explicit_choice() {
        let env = env_of(&[("NO_COLOR", "1"), ("TERM", "xterm-256color")]);
        assert_eq!(ColorChoice::Auto.resolve(&env), ColorMode::Never);
        assert_eq!(
            ColorChoice::Fixed(ColorMode::Indexed256).resolve(&env),
            ColorMode::Indexed256
        );
        let empty_no_color = env_of(&[("NO_COLOR", ""), ("TERM", "xterm-256color")]);
        assert_eq!(
            ColorChoice::Auto.resolve(&empty_no_color),
            ColorMode::Indexed256
        );
        assert_eq!(
            ColorChoice::Auto.resolve(&env_of(&[("TERM", "xterm")])),
            ColorMode::Ansi16
        );
        assert_eq!(
            ColorChoice::Auto.resolve(&env_of(&[("COLORTERM", "truecolor")])),
            ColorMode::TrueColor
        );
    }

    #[test]
    fn color_choice_parses_the_documented_values() {
        assert_eq!(
            "never".parse::<ColorChoice>().unwrap(),
            ColorChoice::Fixed(ColorMode::Never)
        );
        assert_eq!(
            "16".parse::<ColorChoice>().unwrap(),
            ColorChoice::Fixed(ColorMode::Ansi16)
        );
        assert!("purple".parse::<ColorChoice>().is_err());
    }

    #[test]
    fn gauge_fills_proportionally_and_survives_nan() {
        let theme = Theme::new(ColorMode::Never, false);
        assert_eq!(theme.gauge(0.5, 12), "[#####-----]");
        assert_eq!(theme.gauge(f64::NAN, 6), "[----]");
        assert_eq!(theme.gauge(7.0, 6), "[####]");
    }

    #[test]
    fn locale_decides_unicode() {
        assert!(unicode_from_locale(&env_of(&[("LANG", "en_US.UTF-8")])));
        assert!(!unicode_from_locale(&env_of(&[("LANG", "C")])));
        assert!(!unicode_from_locale(&env_of(&[
            ("LC_ALL", "POSIX"),
            ("LANG", "en_US.UTF-8")
        ])));
    }
}
