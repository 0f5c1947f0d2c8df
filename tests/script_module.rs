//! The TorchScript shim: parameters *and* buffers of real PyTorch modules, in
//! PyTorch's order; in-place writes that survive save and reload; clean errors.
use crate::common;

use std::collections::BTreeSet;

use common::{bit_equal, expected_tensor, fixture, torch_dtype_name};
use serde_json::Value;
use tch::Tensor;
use transplant::{Role, ScriptModule};

fn listed(path: &str) -> Vec<(String, String, Vec<i64>, String)> {
    let module = ScriptModule::load(fixture(path)).expect("fixture loads");
    module
        .named_tensors()
        .expect("entries")
        .into_iter()
        .map(|e| (e.name, e.role.to_string(), e.tensor.size(), torch_dtype_name(e.tensor.kind()).to_string()))
        .collect()
}

fn pytorch_state_dict() -> Vec<(String, String, Vec<i64>, String)> {
    let text = std::fs::read_to_string(fixture("bn_net.entries.json")).expect("entries.json");
    let entries: Vec<Value> = serde_json::from_str(&text).expect("valid JSON");
    entries
        .iter()
        .map(|e| {
            let shape =
                e["shape"].as_array().expect("shape").iter().map(|d| d.as_i64().expect("dim")).collect();
            (
                e["name"].as_str().expect("name").to_string(),
                e["role"].as_str().expect("role").to_string(),
                shape,
                e["dtype"].as_str().expect("dtype").to_string(),
            )
        })
        .collect()
}

#[test]
fn scripted_module_lists_state_dict_in_pytorch_order() {
    let expected = pytorch_state_dict();
    assert_eq!(expected.len(), 20, "the fixture is a nested model of 20 tensors");
    assert_eq!(listed("bn_net_a.pt"), expected);
}

#[test]
fn traced_module_lists_the_same_entries() {
    assert_eq!(listed("bn_net_a_traced.pt"), pytorch_state_dict());
}

#[test]
fn batchnorm_statistics_and_custom_buffers_are_buffers() {
    let module = ScriptModule::load(fixture("bn_net_a.pt")).unwrap();
    let entries = module.named_tensors().unwrap();
    let buffers: BTreeSet<&str> =
        entries.iter().filter(|e| e.role == Role::Buffer).map(|e| e.name.as_str()).collect();
    for name in [
        "features.0.bn.running_mean",
        "features.0.bn.running_var",
        "features.0.bn.num_batches_tracked",
        "features.1.0.bn.running_mean",
        "head.2.running_var",
        "temperature",
    ] {
        assert!(buffers.contains(name), "{name} missing from buffers {buffers:?}");
    }
    let tracked = entries.iter().find(|e| e.name == "features.0.bn.num_batches_tracked").unwrap();
    assert_eq!(tracked.tensor.kind(), tch::Kind::Int64);
    assert_eq!(tracked.tensor.int64_value(&[]), 5, "five training batches ran in the fixture script");
    let weight = entries.iter().find(|e| e.name == "features.0.bn.weight").unwrap();
    assert_eq!(weight.role, Role::Parameter);
}

#[test]
fn forward_in_eval_mode_matches_pytorch() {
    let mut module = ScriptModule::load(fixture("bn_net_a.pt")).unwrap();
    module.set_training(false).unwrap();
    assert!(!module.is_training().unwrap());
    let input = expected_tensor("bn_net.expected.safetensors", "input");
    let output = module.forward(&[input]).unwrap();
    assert_eq!(output.len(), 1);
    let want = expected_tensor("bn_net.expected.safetensors", "output_a");
    assert!(output[0].allclose(&want, 1e-5, 1e-6, false), "output differs from PyTorch's");
}

#[test]
fn in_place_write_into_a_buffer_survives_save_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let module = ScriptModule::load(fixture("bn_net_a.pt")).unwrap();
    {
        let entries = module.named_tensors().unwrap();
        let mean = entries.iter().find(|e| e.name == "features.1.0.bn.running_mean").unwrap();
        let _guard = tch::no_grad_guard();
        let mut handle = mean.tensor.shallow_clone();
        handle.f_copy_(&Tensor::full([16], 42.5, (tch::Kind::Float, tch::Device::Cpu))).unwrap();
    }
    // The module itself changed, not a copy of the tensor.
    let again = module.named_tensors().unwrap();
    let mean = again.iter().find(|e| e.name == "features.1.0.bn.running_mean").unwrap();
    assert_eq!(mean.tensor.double_value(&[3]), 42.5);

    let saved = dir.path().join("saved.pt");
    module.save(&saved).unwrap();
    let reloaded = ScriptModule::load(&saved).unwrap();
    let entries = reloaded.named_tensors().unwrap();
    let mean = entries.iter().find(|e| e.name == "features.1.0.bn.running_mean").unwrap();
    assert!(bit_equal(&mean.tensor, &Tensor::full([16], 42.5, (tch::Kind::Float, tch::Device::Cpu))));
}

#[test]
fn copying_parameters_and_buffers_gives_identical_outputs_parameters_alone_does_not() {
    let source = ScriptModule::load(fixture("bn_net_a.pt")).unwrap();
    let input = expected_tensor("bn_net.expected.safetensors", "input");
    let want = source.forward(&[input.shallow_clone()]).unwrap().remove(0);

    for (roles, should_match) in [(vec![Role::Parameter], false), (vec![Role::Parameter, Role::Buffer], true)]
    {
        let mut target = ScriptModule::load(fixture("bn_net_b.pt")).unwrap();
        target.set_training(false).unwrap();
        let _guard = tch::no_grad_guard();
        for (src, dst) in source.named_tensors().unwrap().iter().zip(target.named_tensors().unwrap()) {
            assert_eq!(src.name, dst.name);
            if roles.contains(&src.role) {
                let mut dst = dst.tensor;
                dst.f_copy_(&src.tensor).unwrap();
            }
        }
        let got = target.forward(&[input.shallow_clone()]).unwrap().remove(0);
        assert_eq!(bit_equal(&got, &want), should_match, "copying {roles:?}");
    }
}

#[test]
fn deep_copy_has_tensors_of_its_own() {
    let module = ScriptModule::load(fixture("bn_net_a.pt")).unwrap();
    let copy = module.deep_copy().unwrap();
    let (a, b) = (module.named_tensors().unwrap(), copy.named_tensors().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name, y.name);
        assert!(bit_equal(&x.tensor, &y.tensor));
        assert_ne!(x.tensor.data_ptr(), y.tensor.data_ptr(), "{} shares storage", x.name);
    }
}

fn load_error(path: &std::path::Path) -> String {
    match ScriptModule::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn missing_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.pt");
    let message = load_error(&path);
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn directory_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains(&dir.path().display().to_string()) && message.contains("directory"),
        "{message}"
    );
}

#[test]
fn state_dict_checkpoint_is_not_a_module() {
    let path = fixture("not_a_module.pt");
    let message = load_error(&path);
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn text_file_is_not_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pt");
    std::fs::write(&path, "definitely not a zip archive\n").unwrap();
    let message = load_error(&path);
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn truncated_module_is_an_error_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("bn_net_a.pt")).unwrap();
    for fraction in [0.0, 0.1, 0.5, 0.9, 0.99] {
        let cut = (bytes.len() as f64 * fraction) as usize;
        let path = dir.path().join(format!("cut_{cut}.pt"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let message = load_error(&path);
        assert!(message.contains(&path.display().to_string()), "cut at {cut}: {message}");
    }
}
