//! The integration tests: one binary (each test file a module), so that
//! libtorch is linked once, not once per file. `cargo test --test tests NAME`
//! runs one topic (`cargo test --test tests oracle::`).
mod common;

mod adapter_swap;
mod architecture;
mod checkpoints;
mod cli_completions;
mod cli_copy;
mod cli_diff_verify;
mod cli_inspect;
mod cli_json;
mod cli_plan;
mod concurrency;
mod convert;
mod convert_memory;
mod copy;
mod crash_safe;
mod cuda_backend;
mod dcp;
mod dtypes;
mod full_disk;
mod gpu;
mod hostile_archives;
mod hostile_corpus;
mod hot_swap;
mod intent;
mod mapping;
mod merge;
mod merge_lora;
mod oracle;
mod order_matcher;
mod resource_bounds;
mod rule_ranges;
mod rules_library;
mod rules_library_llm;
mod script_archive;
mod script_module;
mod special_files;
mod stores;
mod sync;
mod terminal_text;
mod torch_save;
mod transforms;
mod transforms_models;
mod varstore_to_script;
