"""Class conditioning and guidance: label dropout, classifier-free guidance, classifier guidance, sample()'s labels."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax.diffusion import guidance
from ddpm_jax.training.checkpoint import DiffusionCheckpoint
from ddpm_jax.configs import build_model, get_config, schedule_from_config
from ddpm_jax.training.setup import create_train_state
from ddpm_jax.sampling.denoiser import guided_denoiser_fn
from ddpm_jax.sampling.generate import _prior_labels, prior_labels, sample
from ddpm_jax.diffusion.guidance import GuidanceInputs
from ddpm_jax.diffusion.samplers import make_ancestral_sampler, make_ddim_sampler
from ddpm_jax.training.train import Batching, make_dataset_train_step, train_step

NUM_CLASSES = 10


def _config(name="report_unet", **model):
    config = get_config("tiny")
    config.model.name = name
    config.model.num_classes = NUM_CLASSES
    if name == "ddpm_unet":
        config.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(14,),
                            norm_groups=4)
    config.model.update(model)
    return config


@pytest.fixture(scope="module")
def conditional():
    """A class-conditional tiny network after one step, so its label embedding matters."""
    config = _config()
    state = create_train_state(config)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(np.arange(40) % NUM_CLASSES, jnp.int32)
    step = make_dataset_train_step(schedule_from_config(config), Batching.from_config(config))
    state, _ = step(state, images, labels)
    return DiffusionCheckpoint.from_train_state(state, config)


def test_drop_labels_replaces_labels_by_the_null_label_at_rate_p_uncond():
    labels = jnp.asarray(np.arange(200_000) % NUM_CLASSES, jnp.int32)
    for p in (0.1, 0.5):
        dropped = guidance.drop_labels(jax.random.PRNGKey(1), labels, p, NUM_CLASSES)
        is_null = np.asarray(dropped == NUM_CLASSES)
        # Binomial standard error at n = 200,000 is at most 0.0011; 5 of them.
        assert abs(is_null.mean() - p) < 0.006
        np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
    kept = guidance.drop_labels(jax.random.PRNGKey(1), labels, 0.0, NUM_CLASSES)
    np.testing.assert_array_equal(kept, labels)


def _step_losses(config, *label_sets):
    """The first train step's loss for each set of labels (one compiled step)."""
    state = create_train_state(config)
    batch = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 28, 28, 1)), jnp.float32)
    step = jax.jit(lambda s, b, y: train_step(s, b, schedule_from_config(config), y)[1]["loss"])
    return [float(step(state, batch, labels)) for labels in label_sets]


def test_train_step_conditions_on_labels_unless_they_are_all_dropped():
    a, b = jnp.zeros((8,), jnp.int32), jnp.full((8,), 7, jnp.int32)
    config = _config()
    config.train.p_uncond = 0.0
    loss_a, loss_b = _step_losses(config, a, b)
    assert loss_a != loss_b  # the labels reach the network
    config.train.p_uncond = 0.999999
    loss_a, loss_b = _step_losses(config, a, b)
    assert loss_a == loss_b  # every label became the null label


def test_train_step_needs_labels_for_a_conditional_network_and_refuses_them_otherwise():
    config = _config()
    batch = jnp.zeros((8, 28, 28, 1))
    with pytest.raises(ValueError, match="needs the batch's labels"):
        train_step(create_train_state(config), batch, schedule_from_config(config))
    plain = get_config("tiny")
    with pytest.raises(ValueError, match="without classes"):
        train_step(create_train_state(plain), batch, schedule_from_config(plain), jnp.zeros((8,), jnp.int32))


@pytest.mark.parametrize("name", ["report_unet", "ddpm_unet"])
@pytest.mark.parametrize("learn_variance", [False, True])
def test_both_networks_take_labels_and_keep_their_output_shape(name, learn_variance):
    config = _config(name, learn_variance=learn_variance)
    model = build_model(config.model)
    x, t = jnp.zeros((3, 28, 28, 1)), jnp.array([0, 4, 9])
    variables = model.init(jax.random.PRNGKey(0), x, t)
    assert variables["params"]["label_embedding"]["embedding"]["embedding"].shape[0] == NUM_CLASSES + 1
    out = model.apply(variables, x, t, y=jnp.array([0, 5, NUM_CLASSES]))
    assert out.shape == (3, 28, 28, 2 if learn_variance else 1)
    # y=None is the null label.
    np.testing.assert_array_equal(model.apply(variables, x, t), model.apply(variables, x, t, y=jnp.full((3,), 10)))


def test_an_unconditional_network_refuses_labels_and_keeps_its_parameter_tree():
    config = get_config("tiny")
    model = build_model(config.model)
    x, t = jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x, t)
    assert "label_embedding" not in variables["params"]
    with pytest.raises(ValueError, match="without classes"):
        model.apply(variables, x, t, y=jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("learn_variance", [False, True])
def test_classifier_free_guidance_at_w0_is_the_conditional_prediction(learn_variance):
    config = _config(learn_variance=learn_variance)
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
    t, y = jnp.array([0, 3, 6, 9]), jnp.array([1, 2, 3, 4])
    conditional = guided_denoiser_fn(config.model, True, "labels")
    unconditional = guided_denoiser_fn(config.model, True, "none")
    guided = guided_denoiser_fn(config.model, True, "classifier_free")
    inputs = GuidanceInputs(variables=checkpoint.variables, labels=y, scale=jnp.float32(0.0))
    cond = conditional(inputs, x, t)
    np.testing.assert_allclose(guided(inputs, x, t), cond, atol=1e-6)
    # w = 2: 3 eps(y) - 2 eps(null) on the eps channels; a learned v stays the conditional one.
    uncond = unconditional(inputs, x, t)
    out = guided(inputs.replace(scale=jnp.float32(2.0)), x, t)
    np.testing.assert_allclose(out[..., :1], 3 * cond[..., :1] - 2 * uncond[..., :1], atol=1e-5)
    if learn_variance:
        np.testing.assert_allclose(out[..., 1:], cond[..., 1:], atol=1e-6)
    np.testing.assert_array_equal(guidance.classifier_free_eps(cond, uncond, 0.0), cond)


def _linear_log_prob_fn(params, x, t):
    """A toy 'classifier' log softmax(W x + b t): its input gradient is known in closed form."""
    return jax.nn.log_softmax(x.reshape(x.shape[0], -1) @ params["w"] + params["b"] * t[:, None])


def _linear_classifier(key, shape=(28, 28, 1)):
    return {"w": 0.05 * jax.random.normal(key, (int(np.prod(shape)), NUM_CLASSES)), "b": jnp.zeros((NUM_CLASSES,))}


def test_classifier_gradient_is_s_times_grad_log_p_of_the_requested_label():
    params = _linear_classifier(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
    t, y = jnp.array([1, 2, 3]), jnp.array([0, 4, 9])
    inputs = GuidanceInputs(variables=None, labels=y, classifier_params=params, classifier_scale=jnp.float32(2.5))
    grad = guidance.classifier_grad_fn(_linear_log_prob_fn)(inputs, x, t)
    # d/dx log softmax(Wx)_y = W[:, y] - W softmax(Wx)
    probs = jax.nn.softmax(x.reshape(3, -1) @ params["w"])
    expected = (params["w"][:, y].T - probs @ params["w"].T).reshape(x.shape)
    np.testing.assert_allclose(grad, 2.5 * expected, rtol=1e-4, atol=1e-6)


def test_classifier_guidance_mean_shift_vanishes_at_s0_and_scales_with_sigma_squared():
    mean, grad = jnp.ones((2, 4, 4, 1)), jnp.full((2, 4, 4, 1), 3.0)
    np.testing.assert_array_equal(guidance.classifier_guided_mean(mean, 0.2, 0.0 * grad), mean)
    np.testing.assert_allclose(guidance.classifier_guided_mean(mean, 0.2, grad), mean + 0.6)
    np.testing.assert_array_equal(guidance.classifier_guided_eps(mean, 0.5, 0.0 * grad), mean)


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_classifier_guided_sampler_at_s0_draws_the_unguided_samples(method):
    """Guidance of an unconditional network by the toy classifier inside the jitted chain: s = 0 changes
    nothing (bit for bit), s > 0 moves the samples, towards the requested class."""
    config = get_config("tiny")
    schedule = schedule_from_config(config)
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    eps_fn = guided_denoiser_fn(config.model, False, "none")
    make = make_ancestral_sampler if method == "ancestral" else make_ddim_sampler
    shape = (6, 28, 28, 1)
    plain = jax.jit(make(eps_fn, schedule, shape))
    guided = jax.jit(make(eps_fn, schedule, shape, cond_fn=guidance.classifier_grad_fn(_linear_log_prob_fn)))
    params = _linear_classifier(jax.random.PRNGKey(2))
    y = jnp.full((6,), 3, jnp.int32)
    inputs = GuidanceInputs(variables=checkpoint.variables, labels=y, classifier_params=params,
                            classifier_scale=jnp.float32(0.0))
    key = jax.random.PRNGKey(5)
    reference = plain(inputs, key)
    np.testing.assert_array_equal(guided(inputs, key), reference)
    steered = guided(inputs.replace(classifier_scale=jnp.float32(50.0)), key)
    assert float(jnp.abs(steered - reference).max()) > 1e-3
    log_p = lambda x: _linear_log_prob_fn(params, x, jnp.zeros((6,), jnp.int32))[:, 3].mean()  # noqa: E731
    assert float(log_p(steered)) > float(log_p(reference))


@pytest.mark.parametrize("method, steps", [("ancestral", None), ("ancestral", 5), ("ddim", 5)])
def test_sample_with_labels_returns_one_image_per_label(conditional, method, steps):
    key = jax.random.PRNGKey(0)
    kw = {"method": method, "steps": steps}
    labels = np.array([0, 1, 2, 3, 4, 5, 6])
    for args in ({"labels": 3}, {"labels": labels}, {"labels": labels, "guidance_scale": 2.0}):
        out = sample(conditional, key, 7, batch_size=4, **kw, **args)
        assert out.shape == (7, 28, 28, 1) and float(jnp.abs(out).max()) <= 1.0
    # The default w is the config's; guidance changes the samples; the labels matter.
    default = sample(conditional, key, 7, labels=labels, **kw)
    w = conditional.config.sampling.guidance_scale
    np.testing.assert_array_equal(default, sample(conditional, key, 7, labels=labels, guidance_scale=w, **kw))
    a = sample(conditional, key, 7, labels=labels, guidance_scale=0.0, **kw)
    assert not np.array_equal(a, sample(conditional, key, 7, labels=labels, guidance_scale=3.0, **kw))
    assert not np.array_equal(a, sample(conditional, key, 7, labels=np.roll(labels, 1), guidance_scale=0.0, **kw))


def test_sampling_a_conditional_network_unconditionally_at_the_null_label(conditional):
    key = jax.random.PRNGKey(3)
    out = sample(conditional, key, 4, unconditional="null")
    assert out.shape == (4, 28, 28, 1)
    assert not np.array_equal(out, sample(conditional, key, 4, labels=0))
    # Configs saved before sampling.unconditional existed keep the null label as their default.
    old = conditional.replace(config=_without_field(conditional.config, "sampling", "unconditional"))
    np.testing.assert_array_equal(sample(old, key, 4), out)


def _without_field(config, section, field):
    d = config.to_dict()
    del d[section][field]
    return ml_collections.FrozenConfigDict(d)


def _with_frequencies(checkpoint, frequencies):
    d = checkpoint.config.to_dict()
    d["data"]["label_frequencies"] = tuple(frequencies)
    return checkpoint.replace(config=ml_collections.FrozenConfigDict(d))


def test_sampling_a_conditional_network_without_labels_draws_them_from_the_label_prior(conditional):
    """No labels: each image's label is drawn from data.label_frequencies with the key, then guided as if given."""
    key = jax.random.PRNGKey(4)
    skewed = _with_frequencies(conditional, [0.0] * 7 + [0.5, 0.0, 0.5])
    labels = _prior_labels(skewed.config, key, 6, None, None)
    assert set(labels.tolist()) <= {7, 9}
    np.testing.assert_array_equal(sample(skewed, key, 6), sample(skewed, key, 6, labels=labels))
    w = 3.0
    np.testing.assert_array_equal(sample(skewed, key, 6, guidance_scale=w),
                                  sample(skewed, key, 6, labels=labels, guidance_scale=w))
    # Many draws follow the frequencies (binomial standard error 0.0016 at n = 100,000; 5 of them).
    frequencies = np.array([0.1, 0.2, 0.0, 0.05, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1])
    many = _prior_labels(_with_frequencies(conditional, frequencies).config, key, 100_000, None, None)
    np.testing.assert_allclose(np.bincount(many, minlength=NUM_CLASSES) / many.size, frequencies, atol=0.008)
    # No frequencies in the config (a network not trained by train_and_evaluate): uniform.
    uniform = _prior_labels(conditional.config, key, 100_000, None, None)
    np.testing.assert_allclose(np.bincount(uniform, minlength=NUM_CLASSES) / uniform.size, 0.1, atol=0.008)
    with pytest.raises(ValueError, match="not a distribution over the 10 classes"):
        sample(_with_frequencies(conditional, [0.5, 0.5]), key, 2)


def test_unconditional_argument_is_refused_for_an_unconditional_network():
    config = get_config("tiny")
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    with pytest.raises(ValueError, match="applies to a class-conditional network"):
        sample(checkpoint, jax.random.PRNGKey(0), 2, unconditional="label_prior")
    assert prior_labels(checkpoint, jax.random.PRNGKey(0), 2) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": 10}, r"labels must lie in 0\.\.9; got 10"),
    ({"labels": [0, 1, 2, -1, 4]}, r"labels must lie in 0\.\.9; got -1 at index 3"),
    ({"labels": [1, 2]}, r"shape \(n,\) = \(5,\).*got shape \(2,\)"),
    ({"labels": np.zeros((5, 1), int)}, r"got shape \(5, 1\)"),
    ({"labels": 1.5}, "labels must be integers"),
    ({"labels": [True] * 5}, "labels must be integers"),
    ({"guidance_scale": 2.0, "unconditional": "null"}, "pass labels="),
    ({"labels": 1, "unconditional": "null"}, "drop it, or drop labels="),
    ({"unconditional": "prior"}, "unknown unconditional='prior'"),
    ({"labels": 1, "guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"labels": 1, "guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
    ({"labels": 1, "guidance": "free"}, "unknown guidance 'free'"),
    ({"labels": 1, "guidance": "classifier"}, "needs classifier="),
])
def test_bad_labels_and_guidance_arguments_get_clear_errors(conditional, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(conditional, jax.random.PRNGKey(0), 5, **kwargs)


def test_labels_for_an_unconditional_network_without_a_classifier_say_what_to_do():
    config = get_config("tiny")
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    with pytest.raises(ValueError, match=r"trained without them \(model.num_classes=0\).*noise-aware classifier"):
        sample(checkpoint, jax.random.PRNGKey(0), 5, labels=3)
    with pytest.raises(ValueError, match="needs a class-conditional network"):
        sample(checkpoint, jax.random.PRNGKey(0), 5, labels=3, guidance="classifier_free")


def _noisy_classifier(run_config):
    """An untrained noise-aware classifier for ``run_config``'s schedule and image size."""
    import ml_collections

    from ddpm_jax.training import noisy_classifier as nc

    from ddpm_jax.training import noisy_classifier_training as nct

    config = nct._full_config(run_config, nc.noisy_classifier_config(), np.zeros((1, 28, 28, 1), np.uint8),
                             np.zeros((1,), np.int32))
    size = run_config.data.image_size
    params = nc.build_noisy_classifier(config.model).init(
        jax.random.PRNGKey(7), jnp.zeros((1, size, size, 1)), jnp.zeros((1,), jnp.int32))["params"]
    return nc.NoisyClassifierCheckpoint(params=params, config=ml_collections.FrozenConfigDict(config.to_dict()))


def test_classifier_guidance_steers_an_unconditional_network_through_sample():
    config = get_config("tiny")
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    classifier = _noisy_classifier(config)
    key, labels = jax.random.PRNGKey(0), np.array([0, 1, 2, 3, 4, 5])
    plain = sample(checkpoint, key, 6)
    at_zero = sample(checkpoint, key, 6, labels=labels, classifier=classifier, guidance_scale=0.0)
    np.testing.assert_array_equal(at_zero, plain)  # s = 0: the mean shift vanishes
    guided = sample(checkpoint, key, 6, labels=labels, classifier=classifier, guidance_scale=50.0)
    assert guided.shape == (6, 28, 28, 1) and not np.array_equal(guided, plain)
    # DDIM on a respaced schedule takes the classifier too (Dhariwal & Nichol's Algorithm 2).
    ddim = sample(checkpoint, key, 6, labels=labels, classifier=classifier, steps=5, method="ddim")
    assert ddim.shape == (6, 28, 28, 1)


def test_a_classifier_of_another_schedule_is_refused():
    config = get_config("tiny")
    checkpoint = DiffusionCheckpoint.from_train_state(create_train_state(config), config)
    other = get_config("tiny")
    other.diffusion.schedule = "linear"
    with pytest.raises(ValueError, match="diffusion.schedule"):
        sample(checkpoint, jax.random.PRNGKey(0), 4, labels=1, classifier=_noisy_classifier(other))
