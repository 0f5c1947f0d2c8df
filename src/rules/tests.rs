//! The rule language's unit and property tests.
use super::*;

fn rules(text: &str) -> Rules {
    Rules::parse(text, "rules.txt").unwrap()
}

fn error(text: &str) -> String {
    Rules::parse(text, "rules.txt").unwrap_err().to_string()
}

#[test]
fn renames_with_groups_and_skips() {
    let r = rules(
        "# comment\n\nbackbone\\.(.*) => encoder.$1\nblocks\\.(\\d+)\\.attn\\.qkv\\.(weight|bias) => layers.$1.attention.in_proj_$2\nskip   head\\..*\n(?P<m>.*)\\.gamma => ${m}.weight\n",
    );
    assert_eq!(r.rules().len(), 4);
    assert_eq!(
        r.apply("backbone.layer1.0.conv1.weight"),
        Outcome::Renamed { to: "encoder.layer1.0.conv1.weight".into(), rule: 0 }
    );
    assert_eq!(
        r.apply("blocks.11.attn.qkv.bias"),
        Outcome::Renamed { to: "layers.11.attention.in_proj_bias".into(), rule: 1 }
    );
    assert_eq!(r.apply("head.fc.weight"), Outcome::Skipped { rule: 2 });
    assert_eq!(r.apply("norm.gamma"), Outcome::Renamed { to: "norm.weight".into(), rule: 3 });
    assert_eq!(r.apply("stem.weight"), Outcome::Kept);
}

#[test]
fn patterns_match_the_whole_name() {
    let r = rules("conv => c\n");
    assert_eq!(r.apply("conv1"), Outcome::Kept);
    assert_eq!(r.apply("a.conv"), Outcome::Kept);
    assert_eq!(r.apply("conv"), Outcome::Renamed { to: "c".into(), rule: 0 });
}

#[test]
fn first_matching_rule_decides() {
    let r = rules("skip a\\.x\na\\.(.*) => b.$1\n");
    assert_eq!(r.apply("a.x"), Outcome::Skipped { rule: 0 });
    assert_eq!(r.apply("a.y"), Outcome::Renamed { to: "b.y".into(), rule: 1 });
}

#[test]
fn bad_rules_name_file_and_line() {
    let message = error("ok => fine\nbad( => x\n");
    assert!(message.contains("rules.txt:2") && message.contains("bad pattern"), "{message}");
    let message = error("frobnicate head.*\n");
    assert!(message.contains("rules.txt:1") && message.contains("expected"), "{message}");
    let message = error("rename features => x\n");
    assert!(message.contains("rules.txt:1") && message.contains("`rename` is not a keyword"), "{message}");
    let message = error("bad( => x\n");
    assert!(!message.contains('\n') && message.contains("unclosed group"), "{message}");
    assert!(error(" => x\n").contains("empty pattern"));
    assert!(error("skip\n").contains("needs a pattern"));
    assert!(error("a => \n").contains("empty replacement"));
    let message = error("a\\.(.*) => b.$2\n");
    assert!(message.contains("$2"), "{message}");
    assert!(error("a => ${nope}\n").contains("nope"));
}

#[test]
fn flags_are_named_in_errors() {
    let mut r = Rules::new();
    r.add_map("x=>y").unwrap();
    let message = r.add_map("no arrow").unwrap_err().to_string();
    assert!(message.contains("--map #2"), "{message}");
    let message = r.add_skip("(").unwrap_err().to_string();
    assert!(message.contains("--skip #1"), "{message}");
}

#[test]
fn dollar_dollar_is_a_literal() {
    let r = rules("a => b$$c\n");
    assert_eq!(r.apply("a"), Outcome::Renamed { to: "b$c".into(), rule: 0 });
}

mod properties {
    use super::super::*;
    use proptest::prelude::*;

    fn dotted_name() -> impl Strategy<Value = String> {
        prop::collection::vec("[a-z_][a-z0-9_]{0,6}|[0-9]{1,3}", 1..6).prop_map(|parts| parts.join("."))
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}") {
            let _ = Rules::parse(&text, "fuzz.txt");
        }

        #[test]
        fn an_escaped_name_matches_exactly_that_name(name in dotted_name(), other in dotted_name()) {
            let rules = Rules::parse(&format!("{} => renamed\n", regex::escape(&name)), "r").unwrap();
            prop_assert_eq!(rules.apply(&name), Outcome::Renamed { to: "renamed".into(), rule: 0 });
            if other != name {
                prop_assert_eq!(rules.apply(&other), Outcome::Kept);
            }
        }

        #[test]
        fn a_prefix_rule_moves_every_name_under_it(prefix in "[a-z]{1,8}", name in dotted_name()) {
            let rules = Rules::parse(&format!("{prefix}\\.(.*) => moved.$1\n"), "r").unwrap();
            let outcome = rules.apply(&format!("{prefix}.{name}"));
            prop_assert_eq!(outcome, Outcome::Renamed { to: format!("moved.{name}"), rule: 0 });
        }

        #[test]
        fn the_first_matching_rule_decides(name in dotted_name(), n in 1usize..6) {
            let text: String = (0..n).map(|i| format!("(.*) => r{i}.$1\n")).collect();
            let rules = Rules::parse(&text, "r").unwrap();
            prop_assert_eq!(rules.apply(&name), Outcome::Renamed { to: format!("r0.{name}"), rule: 0 });
        }
    }
}

#[test]
fn keep_rules_name_target_tensors_and_rename_nothing() {
    let r = rules("keep head\\..*\nskip aux\\..*\n");
    assert_eq!(r.rules().len(), 1, "a keep is not a rule over source names");
    assert_eq!(r.apply("head.weight"), Outcome::Kept);
    let keeps = r.keeps();
    assert_eq!(keeps.len(), 1);
    assert!(keeps[0].matches("head.weight") && !keeps[0].matches("x.head.weight"));
    assert_eq!(
        (keeps[0].to_string(), keeps[0].source.to_string()),
        ("keep head\\..*".into(), "rules.txt:1".into())
    );
    assert!(error("keep\n").contains("`keep` needs a pattern"));
    assert!(error("keep (\n").contains("rules.txt:1"));
    let mut flags = Rules::new();
    flags.add_keep("fc\\..*").unwrap();
    assert_eq!(flags.keeps()[0].source.to_string(), "--keep #1");
    assert!(flags.without_keeps().keeps().is_empty());
}

/// The index finds what trying every rule in order finds: patterns with and
/// without literal text in front, interleaved, more of the latter than are
/// tried one by one, alternations of literals, classes.
#[test]
fn the_index_finds_the_first_rule_that_matches_as_trying_each_would() {
    let mut patterns = Vec::new();
    for i in 0..300 {
        patterns.push(match i % 6 {
            0 => format!("layer\\.{i}\\.weight"),
            1 => format!("(.*)\\.x{}y", i % 40),
            2 => format!("(?:enc|dec)oder\\.{}\\..*", i % 25),
            3 => format!("[a-c]lock\\.{}", i % 30),
            4 => format!("layer\\.{}\\.(.*)", i % 50),
            _ => ".*bias".to_string(),
        });
    }
    let text: String = patterns.iter().enumerate().map(|(i, p)| format!("{p} => t{i}\n")).collect();
    let rules = rules(&text);
    let regexes: Vec<regex::Regex> =
        patterns.iter().map(|p| regex::Regex::new(&format!("^(?:{p})$")).unwrap()).collect();
    let mut names = vec!["layer.3.weight".to_string(), "nothing".to_string(), String::new()];
    for i in 0..60 {
        names.extend([
            format!("layer.{i}.weight"),
            format!("a.b.x{i}y"),
            format!("encoder.{i}.w"),
            format!("decoder.{i}.b.bias"),
            format!("block.{i}"),
            format!("layer.{i}.bias"),
        ]);
    }
    for name in names {
        let expected = regexes.iter().position(|r| r.is_match(&name));
        let got = match rules.apply(&name) {
            Outcome::Renamed { rule, .. } => Some(rule),
            Outcome::Kept => None,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, expected, "{name}");
    }
}

/// `let` constants in op arguments, with integer arithmetic; `--set` values
/// replace a `let`'s value and what is defined from it follows.
#[test]
fn constants_size_op_arguments() {
    let text = "let dim = 64\nlet heads = 4\nlet head_dim = dim / heads\n\
                wq => q | reshape(heads, 2, head_dim / 2, dim) | transpose(1, 2) | reshape(dim, dim)\n";
    let ops = |r: &Rules| r.rules()[0].ops.clone();
    let r = rules(text);
    assert_eq!(r.constants().collect::<Vec<_>>(), vec![("dim", 64), ("heads", 4), ("head_dim", 16)]);
    assert_eq!(ops(&r)[0], Op::Reshape { shape: vec![4, 2, 8, 64] });
    assert_eq!(
        r.rules()[0].to_string(),
        "wq => q | reshape(4, 2, 8, 64) | transpose(1, 2) | reshape(64, 64)"
    );
    let mut sets = Constants::new();
    sets.set("heads", 8).unwrap();
    sets.set("dim", 128).unwrap();
    let r = Rules::parse_with(text, "rules.txt", &sets).unwrap();
    assert_eq!(ops(&r)[0], Op::Reshape { shape: vec![8, 2, 8, 128] });
    assert_eq!(ops(&r)[2], Op::Reshape { shape: vec![128, 128] });
}

/// An undefined name, a division with a remainder (a non-integer), a bad
/// `let` or a `--set` naming no `let`: errors naming the file and line (or
/// the flag), when parsed.
#[test]
fn bad_constants_are_named_where_written() {
    let message = error("let heads = 3\na => b | reshape(heads, 64 / heads)\n");
    assert!(
        message.contains("rules.txt:2") && message.contains("64 / 3") && message.contains("remainder"),
        "{message}"
    );
    let message = error("a => b | reshape(-1)\nc => d | reshape(dim, -1)\n");
    assert!(
        message.contains("rules.txt:2") && message.contains("`dim` is not a defined constant"),
        "{message}"
    );
    let message = error("a => b | reshape(dim)\nlet dim = 4\n");
    assert!(message.contains("rules.txt:1"), "a constant is defined before its use: {message}");
    let message = error("let a = 1\nlet a = 2\n");
    assert!(message.contains("rules.txt:2") && message.contains("twice"), "{message}");
    let message = error("let 2a = 1\n");
    assert!(message.contains("rules.txt:1") && message.contains("not a constant's name"), "{message}");
    let message = error("let a = 7 / 2\n");
    assert!(
        message.contains("rules.txt:1") && message.contains("let a") && message.contains("remainder"),
        "{message}"
    );
    let mut sets = Constants::new();
    sets.set("hedas", 8).unwrap();
    let message = Rules::parse_with("let heads = 4\n", "rules.txt", &sets).unwrap_err().to_string();
    assert!(message.contains("--set hedas") && message.contains("defines no constant `hedas`"), "{message}");
    assert!(message.contains("heads"), "{message}");
    // A set value makes another division inexact: named where it happens.
    let mut sets = Constants::new();
    sets.set("heads", 5).unwrap();
    let message =
        Rules::parse_with("let heads = 4\na => b | reshape(heads, 64 / heads)\n", "rules.txt", &sets)
            .unwrap_err()
            .to_string();
    assert!(message.contains("rules.txt:2") && message.contains("64 / 5"), "{message}");
}

/// A `--map` sees the rules file's constants.
#[test]
fn maps_see_the_constants_of_the_file() {
    let file = rules("let n = 3\n");
    let mut r = Rules::new();
    r.use_constants_of(&file);
    r.add_map("a => b | reshape(n * 2, -1)").unwrap();
    assert_eq!(r.rules()[0].ops[0], Op::Reshape { shape: vec![6, -1] });
    let message = Rules::new().add_map("a => b | reshape(n)").unwrap_err().to_string();
    assert!(message.contains("--map #1") && message.contains("`n`"), "{message}");
}

#[test]
fn fp8_rules_read_a_weight_and_its_scales() {
    let r = rules(
        "let block = 64\n(.*)\\.weight + (.*)\\.weight_scale_inv => $1.weight | dequantize(block * 2, bf16)\n\
         (.*)\\.w => $1.q | quantize(e5m2)\n",
    );
    match &r.rules()[0].action {
        Action::Dequantize { block, dtype, .. } => {
            assert_eq!((*block, *dtype), (128, crate::dtype::Dtype::BFloat16))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.rules()[0].to_string(),
        "(.*)\\.weight + (.*)\\.weight_scale_inv => $1.weight | dequantize(128, bfloat16)"
    );
    assert!(matches!(r.apply("a.weight_scale_inv"), Outcome::Member { member: 1, .. }));
    assert_eq!(r.apply("a.w"), Outcome::Split { to: vec!["a.q".into(), "a.q_scale_inv".into()], rule: 1 });
    assert_eq!(r.rules()[1].to_string(), "(.*)\\.w => $1.q | quantize(128, float8_e5m2)");
}

#[test]
fn fp8_rules_refuse_what_they_cannot_compute() {
    assert!(error("(.*)\\.weight => $1.w | dequantize(128, bf16)").contains("a weight and its block scales"));
    assert!(error("a + b => c | quantize(128, e4m3)").contains("quantize reads one tensor"));
    assert!(error("a => c | quantize(128, bf16)").contains("not one of float8_e4m3fn, float8_e5m2"));
    assert!(error("a + b => c | dequantize(128, float8_e4m3fn)").contains("not one of bfloat16, float32"));
    assert!(error("a + b => c | dequantize(0, bf16)").contains("not positive"));
    assert!(error("a + b => c | dequantize(128, bf16) | reshape(-1)").contains("the rule's one op"));
    assert!(error("a => c | reshape(-1) | quantize(e4m3)").contains("the rule's one op"));
    assert!(error("a => c, d | quantize(e4m3)").contains("makes one target"));
    assert!(error("a + b => c | dequantize(1, 2, bf16)").contains("takes a block size and a dtype"));
}
