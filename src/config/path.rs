//! The field path of a configuration error (`routing.groups[1].weight`), found from the
//! position serde_json reports: the JSON text up to that point says which field it was in.
//!
//! Wrapping every deserializer to track the path as it goes (what `serde_path_to_error` does)
//! doubles the configuration's deserialization code in the `.wasm` (~60 KB measured); an error
//! is rare and its text is at hand, so the path is read back from the text instead.

/// One level of nesting at the error's position.
enum Frame {
    /// An object, and the last key read in it.
    Object(Option<String>),
    /// An array, and the index of the element being read.
    Array(usize),
}

/// The path of the value being read at one-based `line` and `column` (serde_json's error
/// position: the column of the last character it consumed). Empty at the top level.
///
/// An error right after an object's key is about that key when it names a field (`unknown
/// field`); otherwise the key is an enum's variant name (`{"redis": …}` where a string was
/// due) and the error is the enum's: `key_is_field` tells which.
pub fn at(text: &[u8], line: usize, column: usize, key_is_field: bool) -> String {
    let mut start = 0;
    for _ in 1..line {
        match text
            .get(start..)
            .and_then(|t| t.iter().position(|&b| b == b'\n'))
        {
            Some(n) => start += n + 1,
            None => break,
        }
    }
    let end = (start + column).min(text.len());
    let mut frames: Vec<Frame> = Vec::new();
    // In an object, whether the next string is a key.
    let mut key_next = false;
    // The last thing read was an object's key (no `:` yet).
    let mut at_key = false;
    let mut i = 0;
    while i < end {
        let Some(&b) = text.get(i) else { break };
        if !b.is_ascii_whitespace() {
            at_key = false;
        }
        match b {
            b'{' => {
                frames.push(Frame::Object(None));
                key_next = true;
            }
            b'[' => frames.push(Frame::Array(0)),
            b'}' | b']' => {
                frames.pop();
                key_next = false;
            }
            b',' => match frames.last_mut() {
                Some(Frame::Array(n)) => *n += 1,
                Some(Frame::Object(_)) => key_next = true,
                None => {}
            },
            b':' => key_next = false,
            b'"' => {
                let close = string_end(text, i);
                if key_next {
                    if let Some(Frame::Object(key)) = frames.last_mut() {
                        let raw = text.get(i..close.min(text.len())).unwrap_or_default();
                        // (Escapes decoded as serde_json decodes them; a key cut off by the
                        // error's position is taken as far as it goes.)
                        *key = Some(serde_json::from_slice::<String>(raw).unwrap_or_else(|_| {
                            String::from_utf8_lossy(raw.get(1..).unwrap_or_default())
                                .trim_end_matches('"')
                                .to_string()
                        }));
                    }
                    key_next = false;
                    at_key = true;
                }
                i = close;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if at_key && !key_is_field {
        if let Some(Frame::Object(key)) = frames.last_mut() {
            *key = None;
        }
    }
    let mut path = String::new();
    for frame in &frames {
        match frame {
            Frame::Object(Some(key)) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Object(None) => {}
            Frame::Array(n) => {
                path.push('[');
                path.push_str(&n.to_string());
                path.push(']');
            }
        }
    }
    path
}

/// The index just past the string starting at `open` (its closing quote included).
fn string_end(text: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    while let Some(&b) = text.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    text.len()
}
