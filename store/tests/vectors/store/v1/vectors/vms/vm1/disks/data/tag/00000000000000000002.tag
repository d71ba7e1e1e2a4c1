lifeboat-tag 1 58db54bd52ae5839e86899abb2e4b58d406f2271b2b153d66c8c8520cc79aaf1
{
  "vm": "vm1",
  "disk": "data",
  "seq": 2,
  "from_segment": 1,
  "through_segment": 2,
  "time": 1767225660000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "directory",
    "tree": "fa169a01b088232dee45b0027d9a93eedb7bc90c25cf86175d2fe7592d77fcf3"
  }
}