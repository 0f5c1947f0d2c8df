//! Completion scripts and the manual page, made from the same clap
//! definitions as the command line itself (#28).
use std::process::Command;

fn transplant(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_transplant")).args(args).output().unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const SUBCOMMANDS: [&str; 8] = ["inspect", "plan", "copy", "convert", "diff", "verify", "completions", "man"];

#[test]
fn each_shell_gets_a_script_naming_the_subcommands_and_their_flags() {
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let (code, script, stderr) = transplant(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {stderr}");
        for name in SUBCOMMANDS {
            assert!(script.contains(name), "{shell}: no {name}");
        }
        // Flags of the mapping, of copy and of convert, and a value enum's choices.
        for flag in ["keep", "order-from", "allow-partial", "max-shard-size", "save-plan"] {
            assert!(script.contains(flag), "{shell}: no --{flag}");
        }
        // (PowerShell's script completes names, not values.)
        if shell != "powershell" {
            assert!(script.contains("order") && script.contains("exact"), "{shell}: --match's choices");
        }
    }
    // Each is the script its shell reads.
    assert!(transplant(&["completions", "bash"]).1.contains("complete -F _transplant"));
    assert!(transplant(&["completions", "zsh"]).1.starts_with("#compdef transplant"));
    assert!(transplant(&["completions", "fish"]).1.contains("complete -c transplant"));
    assert!(transplant(&["completions", "powershell"]).1.contains("Register-ArgumentCompleter"));
}

#[test]
fn an_unknown_shell_is_a_usage_error_naming_the_choices() {
    let (code, _, stderr) = transplant(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("bash") && stderr.contains("powershell"), "{stderr}");
}

#[test]
fn the_manual_page_has_a_name_a_synopsis_and_the_subcommands() {
    let (code, page, stderr) = transplant(&["man"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(page.starts_with(".ie") || page.starts_with(".TH"), "not roff: {}", &page[..80.min(page.len())]);
    assert!(page.contains(".TH transplant 1"), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}:\n{page}");
    }
    assert!(page.contains("transplant \\- Move the complete state of PyTorch models"), "{page}");
    for name in SUBCOMMANDS {
        assert!(page.contains(&format!("transplant\\-{name}(1)")), "no {name}:\n{page}");
    }
    // Each page the main page lists is there, with its own flags.
    let (code, page, stderr) = transplant(&["man", "copy"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(page.contains(".TH transplant-copy 1"), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
        assert!(page.contains(section), "no {section}:\n{page}");
    }
    for flag in ["allow\\-partial", "keep", "order\\-from", "max\\-shard\\-size"] {
        assert!(page.contains(&format!("\\-\\-{flag}")), "no --{flag}:\n{page}");
    }
    assert_eq!(transplant(&["man", "nosuch"]).0, 2);
}
