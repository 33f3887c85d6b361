// qwen_generate: greedy generation from a qwen-deploy artifact with the ONNX Runtime C++ API.
//
//   qwen_generate ARTIFACT [--max-new-tokens N] [--threads N] [--ignore-eos] TOKEN_ID...
//
// Reads ARTIFACT/manifest.json (the contract in docs/artifact.md), runs the prompt's token ids
// through model.onnx once (prefill), then feeds one token per step (decode), carrying the KV cache
// from each step's present.* outputs into the next step's past_key_values.* inputs without a copy.
// Prints the generated token ids on stdout, one line, space-separated; timings go to stderr.
// Tokenization and the chat template stay with the caller (docs/artifact.md says how).

#include <onnxruntime_cxx_api.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int kFormatVersion = 1;

struct Options {
  std::string artifact;
  std::vector<int64_t> prompt;
  int max_new_tokens = 16;
  int threads = 0;
  bool ignore_eos = false;
};

// What the program needs from manifest.json.
struct Manifest {
  std::string model_file;
  int num_layers = 0;
  std::set<int64_t> eos_token_ids;
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "error: " << problem << "\n"
            << "usage: qwen_generate ARTIFACT [--max-new-tokens N] [--threads N] [--ignore-eos] "
               "TOKEN_ID...\n";
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options opt;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> int {
      if (i + 1 >= args.size()) usage(a + " needs a value");
      try {
        return std::stoi(args[++i]);
      } catch (const std::exception&) {
        usage(a + " needs an integer, got '" + args[i] + "'");
      }
    };
    if (a == "--max-new-tokens") {
      opt.max_new_tokens = value();
    } else if (a == "--threads") {
      opt.threads = value();
    } else if (a == "--ignore-eos") {
      opt.ignore_eos = true;
    } else if (opt.artifact.empty()) {
      opt.artifact = a;
    } else {
      try {
        size_t used = 0;
        opt.prompt.push_back(std::stoll(a, &used));
        if (used != a.size()) throw std::invalid_argument(a);
      } catch (const std::exception&) {
        usage("token ids are integers, got '" + a + "'");
      }
    }
  }
  if (opt.artifact.empty()) usage("missing ARTIFACT folder");
  if (opt.prompt.empty()) usage("give the prompt as token ids");
  if (opt.max_new_tokens < 1) usage("--max-new-tokens must be >= 1");
  return opt;
}

Manifest load_manifest(const std::string& folder) {
  const std::string path = folder + "/manifest.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + " not found: ARTIFACT must be a qwen-deploy artifact");
  nlohmann::json j = nlohmann::json::parse(in);
  const int version = j.at("format_version").get<int>();
  if (version != kFormatVersion) {
    throw std::runtime_error("manifest format_version is " + std::to_string(version) +
                             ", this program reads " + std::to_string(kFormatVersion));
  }
  if (j.contains("engine") && !j.at("engine").is_null()) {
    throw std::runtime_error("this artifact is a TensorRT engine; give an ONNX artifact");
  }
  Manifest m;
  m.model_file = j.at("model_file").get<std::string>();
  m.num_layers = j.at("model").at("num_layers").get<int>();
  for (const auto& id : j.at("eos_token_ids")) m.eos_token_ids.insert(id.get<int64_t>());
  return m;
}

// Index of the largest logit in the last position of logits [1, seq, vocab] (float or float16).
int64_t argmax_last(const Ort::Value& logits) {
  const auto info = logits.GetTensorTypeAndShapeInfo();
  const auto shape = info.GetShape();
  const int64_t vocab = shape.at(2);
  const size_t offset = static_cast<size_t>((shape.at(1) - 1) * vocab);
  if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    const float* row = logits.GetTensorData<float>() + offset;
    return std::max_element(row, row + vocab) - row;
  }
  if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    const Ort::Float16_t* row = logits.GetTensorData<Ort::Float16_t>() + offset;
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i) {
      if (row[i].ToFloat() > row[best].ToFloat()) best = i;
    }
    return best;
  }
  throw std::runtime_error("logits must be float or float16");
}

class Generator {
 public:
  Generator(const Options& opt, const Manifest& manifest)
      : manifest_(manifest), session_(nullptr) {
    Ort::SessionOptions so;
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    // errors only: onnxruntime warns at load that logits_to_keep (an input with a default
    // initializer) is among the graph inputs, which is intended
    so.SetLogSeverityLevel(ORT_LOGGING_LEVEL_ERROR);
    if (opt.threads > 0) so.SetIntraOpNumThreads(opt.threads);
    const std::string model = opt.artifact + "/" + manifest.model_file;
    session_ = Ort::Session(env_, model.c_str(), so);

    // The graph contract: these inputs and outputs, in this order in our arrays.
    input_names_ = {"input_ids", "attention_mask", "position_ids"};
    output_names_ = {"logits"};
    for (int i = 0; i < manifest.num_layers; ++i) {
      for (const char* kv : {"key", "value"}) {
        input_names_.push_back("past_key_values." + std::to_string(i) + "." + kv);
        output_names_.push_back("present." + std::to_string(i) + "." + kv);
      }
    }
    check_names();
    // Optional input (docs/artifact.md): logits for the last position only, so the prefill runs
    // the LM head once instead of once per prompt token. Older artifacts lack it.
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < session_.GetOverridableInitializerCount(); ++i) {
      if (session_.GetOverridableInitializerNameAllocated(i, alloc).get() ==
          std::string("logits_to_keep")) {
        input_names_.push_back("logits_to_keep");
      }
    }
    for (const auto& n : input_names_) in_names_.push_back(n.c_str());  // fixed from here on
    for (const auto& n : output_names_) out_names_.push_back(n.c_str());
  }

  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int max_new_tokens,
                                bool ignore_eos) {
    std::vector<Ort::Value> past = empty_cache();
    std::vector<int64_t> tokens = prompt;  // tokens fed at this step
    std::vector<int64_t> generated;
    int64_t past_len = 0;
    auto t0 = std::chrono::steady_clock::now();
    double prefill_ms = 0;
    while (static_cast<int>(generated.size()) < max_new_tokens) {
      const int64_t seq = static_cast<int64_t>(tokens.size());
      std::vector<int64_t> mask(static_cast<size_t>(past_len + seq), 1);
      std::vector<int64_t> positions(static_cast<size_t>(seq));
      for (int64_t i = 0; i < seq; ++i) positions[static_cast<size_t>(i)] = past_len + i;

      const std::vector<int64_t> ids_shape{1, seq}, mask_shape{1, past_len + seq};
      std::vector<Ort::Value> inputs;
      inputs.push_back(int64_tensor(tokens, ids_shape));
      inputs.push_back(int64_tensor(mask, mask_shape));
      inputs.push_back(int64_tensor(positions, ids_shape));
      for (auto& v : past) inputs.push_back(std::move(v));
      if (inputs.size() < input_names_.size()) {  // logits_to_keep = 1: a scalar
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory_, &keep_last_, 1, nullptr, 0));
      }

      std::vector<Ort::Value> outputs =
          session_.Run(Ort::RunOptions{nullptr}, in_names_.data(), inputs.data(), inputs.size(),
                       out_names_.data(), out_names_.size());

      const int64_t next = argmax_last(outputs[0]);
      generated.push_back(next);
      if (generated.size() == 1) {
        prefill_ms = ms_since(t0);
        t0 = std::chrono::steady_clock::now();
      }
      // present.* (past + seq positions) become the next step's past_key_values.*
      past.clear();
      for (size_t i = 1; i < outputs.size(); ++i) past.push_back(std::move(outputs[i]));
      past_len += seq;
      tokens = {next};
      if (!ignore_eos && manifest_.eos_token_ids.count(next)) break;
    }
    const double decode_ms = ms_since(t0);
    std::fprintf(stderr, "prefill %zu tokens: %.1f ms; decode %zu tokens: %.1f ms (%.1f tokens/s)\n",
                 prompt.size(), prefill_ms, generated.size() - 1, decode_ms,
                 decode_ms > 0 ? 1000.0 * static_cast<double>(generated.size() - 1) / decode_ms : 0);
    return generated;
  }

 private:
  static double ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
  }

  void check_names() {
    Ort::AllocatorWithDefaultOptions alloc;
    std::set<std::string> graph_outputs;
    for (size_t i = 0; i < session_.GetInputCount(); ++i) {
      graph_inputs_[session_.GetInputNameAllocated(i, alloc).get()] = i;
    }
    for (size_t i = 0; i < session_.GetOutputCount(); ++i) {
      graph_outputs.insert(session_.GetOutputNameAllocated(i, alloc).get());
    }
    for (const auto& n : input_names_) {
      if (!graph_inputs_.count(n)) throw std::runtime_error("graph has no input " + n);
    }
    for (const auto& n : output_names_) {
      if (!graph_outputs.count(n)) throw std::runtime_error("graph has no output " + n);
    }
    if (graph_inputs_.size() != input_names_.size()) {
      throw std::runtime_error("graph inputs differ from the manifest's layer count");
    }
  }

  Ort::Value int64_tensor(std::vector<int64_t>& data, const std::vector<int64_t>& shape) {
    return Ort::Value::CreateTensor<int64_t>(memory_, data.data(), data.size(), shape.data(),
                                             shape.size());
  }

  // past_key_values.* with past_sequence_length 0: [1, kv_heads, 0, head_dim], the graph's dtype.
  std::vector<Ort::Value> empty_cache() {
    std::vector<Ort::Value> cache;
    for (size_t i = 3; i < 3 + 2 * static_cast<size_t>(manifest_.num_layers); ++i) {
      auto type = session_.GetInputTypeInfo(graph_inputs_.at(input_names_[i]));
      auto info = type.GetTensorTypeAndShapeInfo();
      std::vector<int64_t> shape = info.GetShape();  // [batch, kv_heads, past, head_dim]
      shape[0] = 1;
      shape[2] = 0;
      cache.push_back(Ort::Value::CreateTensor(allocator_, shape.data(), shape.size(),
                                               info.GetElementType()));
    }
    return cache;
  }

  int64_t keep_last_ = 1;
  Manifest manifest_;
  Ort::Env env_{ORT_LOGGING_LEVEL_WARNING, "qwen_generate"};
  Ort::Session session_;
  Ort::AllocatorWithDefaultOptions allocator_;
  Ort::MemoryInfo memory_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<std::string> input_names_, output_names_;
  std::vector<const char*> in_names_, out_names_;  // c_str() views of the two above
  std::map<std::string, size_t> graph_inputs_;  // graph input name -> its index in the session
};

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  try {
    const Manifest manifest = load_manifest(opt.artifact);
    Generator generator(opt, manifest);
    const std::vector<int64_t> out = generator.generate(opt.prompt, opt.max_new_tokens,
                                                        opt.ignore_eos);
    for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? " " : "") << out[i];
    std::cout << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  }
  return 0;
}
