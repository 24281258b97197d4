"""Files: the mcmoe.* keys, our type ids, the bounded pre-read, the vocabulary and the writer."""
