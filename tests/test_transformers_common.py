"""transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``, ``TrainingTesterMixin``) on
``VKTForCausalLM`` / ``VKTModel`` and on a converted tiny Llama hybrid.

The test files come from the source distribution of the installed transformers (``tests/transformers_suite.py``
fetches them into ``.cache/``). Run this group with ``pytest -m transformers_common`` (``make test-common``).
Each skip names its reason; the only skips are those transformers applies to its own recurrent models
(Mamba, RWKV, Qwen3-Next) or to features a model of this kind does not have.
"""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.auto import modeling_auto

import vkt_hf
from tests import transformers_suite

# transformers' tests check some warnings (deprecated argument names): let them through the suite's filter
pytestmark = [pytest.mark.transformers_common, pytest.mark.filterwarnings("default::FutureWarning")]

try:
    common = transformers_suite.load("test_modeling_common")
    config_common = transformers_suite.load("test_configuration_common")
    training_common = transformers_suite.load("test_training_mixin")
except transformers_suite.Unavailable as err:  # offline: nothing to run
    pytest.skip(str(err), allow_module_level=True)

ModelTesterMixin = common.ModelTesterMixin
# the sdist has no generation tests: the stand-in is empty, tests/test_generation_common.py checks generation
GenerationTesterMixin = common.GenerationTesterMixin
ConfigTester = config_common.ConfigTester
TrainingTesterMixin = training_common.TrainingTesterMixin
ids_tensor = common.ids_tensor

# transformers' common tests tell base models from causal LMs by the class names in its Auto mappings (a model
# inside transformers is listed there): list ours while a test runs
AUTO_NAMES = {
    "MODEL_MAPPING_NAMES": {"vkt": "VKTModel"},
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {"vkt": "VKTForCausalLM", "vkt_hybrid": "VKTHybridForCausalLM"},
}


class TinyTester:
    """Builds the tiny config and inputs the common tests run on (the role of transformers' ``CausalLMModelTester``)."""

    batch_size = 2
    seq_length = 7
    is_training = True
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    intermediate_size = 37
    causal_lm_class = vkt_hf.VKTForCausalLM

    def __init__(self, parent, get_config):
        self.parent = parent
        self._get_config = get_config

    def get_config(self):
        return self._get_config(self)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0  # one left-padded row
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


def native_config(tester: TinyTester) -> vkt_hf.VKTConfig:
    """A VKT layer and a softmax layer, so both mixers (and the softmax layers' attention dispatch) run."""
    return vkt_hf.VKTConfig(
        layer_types=["linear_attention", "full_attention"],
        vocab_size=tester.vocab_size,
        hidden_size=tester.hidden_size,
        intermediate_size=tester.intermediate_size,
        num_hidden_layers=tester.num_hidden_layers,
        num_attention_heads=tester.num_attention_heads,
        local_window=3,
        pad_token_id=0,
    )


def hybrid_config(tester: TinyTester) -> vkt_hf.VKTHybridConfig:
    base = LlamaConfig(
        vocab_size=tester.vocab_size,
        hidden_size=tester.hidden_size,
        intermediate_size=tester.intermediate_size,
        num_hidden_layers=tester.num_hidden_layers,
        num_attention_heads=tester.num_attention_heads,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return vkt_hf.VKTHybridConfig(base_config=base, vkt_layers=[1], vkt_options={"local_attention_window": 4})


class CommonTests(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin):
    """What both test classes add to transformers' mixins."""

    def setUp(self):
        for name, entries in AUTO_NAMES.items():
            patch = mock.patch.dict(getattr(modeling_auto, name), entries)
            patch.start()
            self.addCleanup(patch.stop)

    def test_attention_outputs(self):
        """Overridden as Qwen3-Next's: each VKT layer returns its scalar attentions ``(B, H, N)``, each softmax
        layer (eager) its ``(B, H, N, N)`` weights; the rest of transformers' test is the same."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config._attn_implementation = "eager"
        heads, length = self.model_tester.num_attention_heads, self.model_tester.seq_length
        for model_class in self.all_model_classes:
            for by_config in (False, True):
                model = model_class._from_config(config, attn_implementation="eager").eval()
                if by_config:
                    model.config.output_attentions = True
                kwargs = {} if by_config else {"output_attentions": True}
                with torch.no_grad():
                    outputs = model(**inputs, **kwargs)
                shapes = [list(a.shape[1:]) for a in outputs.attentions]
                expected = [[heads, length] if k == "vkt" else [heads, length, length] for k in self.layer_kinds]
                self.assertEqual(shapes, expected)
                with torch.no_grad():
                    both = model(**inputs, **kwargs, output_hidden_states=True)
                self.assertEqual(len(both), len(outputs) + 1)  # attentions stay last
                self.assertIs(type(both[-1]), tuple)


class VKTModelTest(CommonTests, unittest.TestCase):
    all_model_classes = (vkt_hf.VKTModel, vkt_hf.VKTForCausalLM)
    layer_kinds = ("vkt", "softmax")

    @property
    def model_tester(self):
        return self._tester

    @model_tester.setter
    def model_tester(self, value):
        self._tester = value

    def setUp(self):
        super().setUp()
        self.model_tester = TinyTester(self, native_config)
        self.config_tester = ConfigTester(self, config_class=vkt_hf.VKTConfig, hidden_size=48)

    def test_config(self):
        self.config_tester.run_common_tests()


class VKTHybridModelTest(CommonTests, unittest.TestCase):
    all_model_classes = (vkt_hf.VKTHybridForCausalLM,)
    layer_kinds = ("softmax", "vkt")

    @property
    def model_tester(self):
        return self._tester

    @model_tester.setter
    def model_tester(self, value):
        self._tester = value

    def setUp(self):
        super().setUp()
        self.model_tester = TinyTester(self, hybrid_config)
        self.model_tester.causal_lm_class = vkt_hf.VKTHybridForCausalLM
        self.config_tester = ConfigTester(
            self, config_class=vkt_hf.VKTHybridConfig, common_properties=["hidden_size", "num_hidden_layers"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()
