// Plugin<Op> and Creator<Op>: the IPluginV3 and the IPluginCreatorV3One of one pimoe op, written once for the four
// ops. Each op is a description `Op` (plugins/trt/<op>/<op>Plugin.h) that knows its attributes, I/O contract,
// workspace and launch; this template does everything TensorRT asks of a plugin around it: entry points that never
// throw, field declaration / reading / serialisation through visit_attrs (pimoe_attrs.h), the checks at build and
// shape-change time, and an enqueue that only compares and launches.
//
// What an Op provides (see routePlugin.h for the smallest one):
//   static constexpr const char* kNAME;  static constexpr int32_t kNB_OUTPUTS;
//   using Attrs = <attribute struct of pimoe_attrs.h>;   struct Plan { ...; size_t workspace; };
//   Attrs attrs;  explicit Op(const Attrs&);             (it may derive more from the attributes once)
//   static std::string validate(const Attrs&);           createPlugin: contract + kernel limits ("" when fine)
//   std::string check_counts(int32_t nbInputs, int32_t nbOutputs) const;
//   std::string output_types(const DataType* in, DataType* out) const;
//   std::string output_shapes(const DimsExprs* in, int32_t nbInputs, DimsExprs* out, IExprBuilder&) const;
//   bool supports(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nbInputs) const;  (linear format and the
//                                                        counts are already checked)
//   size_t workspace_size(const DynamicPluginTensorDesc* in, int32_t nbInputs) const;      (the profile maximum)
//   std::string check_io(const std::vector<TensorInfo>& in, int32_t nbOutputs) const;     (shapes and dtypes)
//   Plan plan(const std::vector<TensorInfo>& in) const;  everything enqueue needs, after check_io passed
//   cudaError_t launch(const Plan&, const void* const* in, void* const* out, void* workspace, cuda::DeviceStatus*,
//                      cudaStream_t) const;           enqueues the kernels; no validation, no allocation
//
// Validation happens once per set of attributes (createPlugin: Op::validate) and once per set of shapes
// (configurePlugin / onShapeChange: Op::check_io, then Op::plan). enqueue compares the tensor descriptions it is
// given with those of onShapeChange, checks pointers and launches: no attribute validation and no heap allocation
// (tests/emu/test_emu.py counts the allocations of enqueue on the emulated harness).
//
// Adding an attribute to an op: a member in its Attrs struct and a line in its visit_attrs (pimoe_attrs.h), its
// checks in validate_attrs, its use in the Op's plan/launch. Declaration (getFieldNames), reading (createPlugin)
// and serialisation (getFieldsToSerialize) follow from visit_attrs.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "pimoePluginCommon.h"

namespace pimoe {
namespace trt {

// What a plugin keeps of one tensor between onShapeChange and enqueue.
struct RunTensor {
  nvinfer1::Dims64 dims{};
  DataType type = DataType::kFLOAT;
  bool empty = true;  // no elements: its pointer may be null
};
RunTensor run_tensor(const PluginTensorDesc& desc) noexcept;
// same dims and dtype; no allocation
bool same_tensor(const PluginTensorDesc& desc, const RunTensor& t) noexcept;

template <class Op>
class Plugin final : public PluginBase {
 public:
  using Attrs = typename Op::Attrs;
  using Plan = typename Op::Plan;

  explicit Plugin(const Attrs& attrs) : PluginBase(Op::kNAME), mOp(attrs) {}

  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      auto copy = std::make_unique<Plugin>(mOp.attrs);
      copy->mPlan = mPlan;
      copy->mIn = mIn;
      copy->mOut = mOut;
      copy->mShaped = mShaped;
      return copy.release();
    } catch (...) {
      fail(msg(mName, ": clone failed (out of memory)"));
      return nullptr;
    }
  }

  // ---------------------------------------------------------------------------------------- IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return Op::kNB_OUTPUTS; }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                             int32_t nbInputs) const noexcept override {
    return guard("getOutputDataTypes", [&]() -> std::string {
      if (auto e = mOp.check_counts(nbInputs, nbOutputs); !e.empty()) return e;
      return mOp.output_types(inputTypes, outputTypes);
    });
  }

  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs*, int32_t,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override {
    return guard("getOutputShapes", [&]() -> std::string {
      if (auto e = mOp.check_counts(nbInputs, nbOutputs); !e.empty()) return e;
      return mOp.output_shapes(inputs, nbInputs, outputs, exprBuilder);
    });
  }

  bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    try {
      if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs) return false;
      if (!mOp.check_counts(nbInputs, nbOutputs).empty()) return false;
      if (inOut[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
      return mOp.supports(pos, inOut, nbInputs);
    } catch (...) {
      return false;
    }
  }

  size_t getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs, const DynamicPluginTensorDesc*,
                          int32_t) const noexcept override {
    try {
      return inputs == nullptr ? 0 : mOp.workspace_size(inputs, nbInputs);
    } catch (...) {
      return 0;
    }
  }

  int32_t configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc*,
                          int32_t nbOutputs) noexcept override {
    return guard("configurePlugin", [&] { return mOp.check_io(tensor_infos(in, nbInputs), nbOutputs); });
  }

  // ---------------------------------------------------------------------------------------- IPluginV3OneRuntime
  // The shapes of the next enqueues: checked and planned here, once.
  int32_t onShapeChange(const PluginTensorDesc* in, int32_t nbInputs, const PluginTensorDesc* out,
                        int32_t nbOutputs) noexcept override {
    mShaped = false;
    const int32_t rc = guard("onShapeChange", [&]() -> std::string {
      if (in == nullptr || out == nullptr) return msg(mName, ": onShapeChange called without tensors");
      const std::vector<TensorInfo> infos = tensor_infos(in, nbInputs);
      if (auto e = mOp.check_io(infos, nbOutputs); !e.empty()) return e;
      std::vector<DataType> in_types, want(static_cast<size_t>(nbOutputs));
      for (const TensorInfo& t : infos) in_types.push_back(t.type);
      if (auto e = mOp.output_types(in_types.data(), want.data()); !e.empty()) return e;
      for (int32_t o = 0; o < nbOutputs; ++o)
        if (out[o].type != want[static_cast<size_t>(o)])
          return msg(mName, ": output ", o, " is ", dtype_name(out[o].type), ", expected ",
                     dtype_name(want[static_cast<size_t>(o)]));
      mPlan = mOp.plan(infos);
      mIn.clear();
      mOut.clear();
      for (int32_t i = 0; i < nbInputs; ++i) mIn.push_back(run_tensor(in[i]));
      for (int32_t o = 0; o < nbOutputs; ++o) mOut.push_back(run_tensor(out[o]));
      return {};
    });
    if (rc != kOK) return rc;
    ensure_status();  // builder instances (timing runs) are never attached: their block comes here
    mShaped = true;
    return kOK;
  }

  // Compare, check pointers, launch: everything else was decided at onShapeChange.
  int32_t enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* outputDesc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    try {
      if (!mShaped) return fail(msg(mName, ": enqueue called before onShapeChange"));
      if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
        return fail(msg(mName, ": enqueue called without tensors"));
      for (size_t i = 0; i < mIn.size(); ++i) {
        if (!same_tensor(inputDesc[i], mIn[i]))
          return fail(msg(mName, ": input ", i, " differs from its description at onShapeChange"));
        if (inputs[i] == nullptr && !mIn[i].empty) return fail(msg(mName, ": input ", i, " is a null pointer"));
      }
      for (size_t o = 0; o < mOut.size(); ++o) {
        if (!same_tensor(outputDesc[o], mOut[o]))
          return fail(msg(mName, ": output ", o, " differs from its description at onShapeChange"));
        if (outputs[o] == nullptr && !mOut[o].empty) return fail(msg(mName, ": output ", o, " is a null pointer"));
      }
      if (status() == nullptr) return fail(msg(mName, ": cannot run: ", status_error()));
      if (workspace == nullptr && mPlan.workspace > 0)
        return fail(msg(mName, ": no workspace (", mPlan.workspace, " bytes needed)"));
      return finish_enqueue(mOp.launch(mPlan, inputs, outputs, workspace, status(), stream), stream);
    } catch (...) {
      return fail(msg(mName, ": enqueue failed"));
    }
  }

  const PluginFieldCollection* getFieldsToSerialize() noexcept override {
    try {
      mSerialized.clear();
      Attrs attrs = mOp.attrs;
      visit_attrs(attrs, mSerialized);
      return mSerialized.collection();
    } catch (...) {
      fail(msg(mName, ": getFieldsToSerialize failed"));
      return nullptr;
    }
  }

 private:
  // runs `body` (returning "" or the problem) so that nothing escapes a TensorRT entry point
  template <class Body>
  int32_t guard(const char* what, Body&& body) const noexcept {
    try {
      const std::string problem = body();
      return problem.empty() ? kOK : fail(problem);
    } catch (...) {
      return fail(msg(mName, ": ", what, " failed"));
    }
  }

  Op mOp;
  Plan mPlan{};
  std::vector<RunTensor> mIn, mOut;  // the descriptions of onShapeChange
  bool mShaped = false;
  FieldWriter mSerialized;
};

template <class Op>
class Creator final : public CreatorBase {
 public:
  Creator() : CreatorBase(Op::kNAME) {
    typename Op::Attrs defaults;
    visit_attrs(defaults, mDeclarations);
  }

  nvinfer1::IPluginV3* createPlugin(const char*, const PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase) noexcept override {
    try {
      FieldReader reader(Op::kNAME, fc);
      typename Op::Attrs attrs;
      visit_attrs(attrs, reader);
      reader.warn_unknown();
      if (!reader.problem().empty()) {
        fail(reader.problem());
        return nullptr;
      }
      if (auto e = Op::validate(attrs); !e.empty()) {
        fail(e);
        return nullptr;
      }
      return new Plugin<Op>(attrs);
    } catch (...) {
      fail(msg(Op::kNAME, ": createPlugin failed (out of memory)"));
      return nullptr;
    }
  }
};

}  // namespace trt
}  // namespace pimoe
