//! The flag reference of `docs/serving.md`, written from the clap
//! definitions themselves so that the documentation cannot drift from the
//! flags (`tests/docs.rs` fails when the file differs from this; run it with
//! `BATCHGEN_BLESS=1` to rewrite the file).
use clap::CommandFactory;

/// Markdown tables of `batchgen serve`'s flags, one per help heading in the
/// order `--help` shows them: flag, environment variable, default, meaning
/// (the flag's doc comment) and, for a closed set, its values.
pub fn flag_reference() -> String {
    let cli = super::Cli::command();
    let serve = cli.find_subcommand("serve").expect("the serve subcommand");
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let heading = arg.get_help_heading().unwrap_or("Other").to_string();
        let env = arg.get_env().map_or("".into(), |e| format!("`{}`", e.to_string_lossy()));
        let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let default = if defaults.is_empty() { "".into() } else { format!("`{}`", defaults.join(",")) };
        let help = arg.get_long_help().or_else(|| arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
        let mut meaning = help.split_whitespace().collect::<Vec<_>>().join(" ");
        if !meaning.is_empty() && !meaning.ends_with('.') && !meaning.ends_with(".)") {
            meaning.push('.');
        }
        let values: Vec<String> = arg.get_possible_values().iter().map(|v| format!("`{}`", v.get_name())).collect();
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values());
        if !values.is_empty() && takes_value && !is_bool(arg) {
            meaning.push_str(&format!(" Values: {}.", values.join(", ")));
        }
        let row = format!("| `--{long}` | {env} | {default} | {} |", meaning.replace('|', "\\|"));
        match groups.iter_mut().find(|g| g.0 == heading) {
            Some(g) => g.1.push(row),
            None => groups.push((heading, vec![row])),
        }
    }
    let mut out = String::new();
    for (heading, rows) in groups {
        out.push_str(&format!("### {heading}\n\n| flag | env | default | meaning |\n|---|---|---|---|\n"));
        for row in rows {
            out.push_str(&row);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// A switch (`--log-prompts`): present or not, no value.
fn is_bool(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::SetFalse)
}
