lifeboat-tag 1 1018a7577b95059fa2fdcaecf8370941a22499f39ee11332f132cca09ae16c07
{
  "vm": "vm1",
  "disk": "data",
  "seq": 1853070350745600002,
  "from_segment": 1853070350745600001,
  "through_segment": 1853070350745600002,
  "time": 1767225660000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "directory",
    "tree": "fa169a01b088232dee45b0027d9a93eedb7bc90c25cf86175d2fe7592d77fcf3"
  }
}