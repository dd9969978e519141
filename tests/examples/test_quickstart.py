from examples import quickstart


def test_quickstart_improves_agreement_with_the_teacher():
    before, after = quickstart.main(
        ["--num-classes", "100", "--num-examples", "2048", "--epochs", "3"]
    )
    # Measured: ~0.01 before, ~0.5 after on every backend.
    assert after > before + 0.2, (before, after)
