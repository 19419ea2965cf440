def test_train(trained_digits):
    print(trained_digits["version_dir"], len(trained_digits["rows"]))
    import json
    m = json.loads((trained_digits["version_dir"]/"manifest.json").read_text())
    print(m["classes"], len(m["training_assets"]))
    print(sum(r["is_issue"] for r in trained_digits["rows"]))
