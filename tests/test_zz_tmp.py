from tests.dicomgen import phantom


def test_x():
    assert phantom().shape == (7, 10, 12)
