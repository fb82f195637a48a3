//! The batch's KV layout: rows left-padded to a common length `L`, so that
//! every row's newest token sits in the same column and one ORT run serves
//! all of them. These pure functions do the two copies the layout needs:
//! joining newly prefilled rows and dropping finished rows (trimming columns
//! that have become padding for every row left).
//!
//! Tensors are `[batch, heads, len, head_dim]`, row-major.

/// Shape of one KV tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn elements(&self) -> usize {
        self.batch * self.heads * self.len * self.head_dim
    }
}

/// Keeps `rows` (in that order) and the last `len` columns of each.
pub fn select<T: Copy>(data: &[T], shape: KvShape, rows: &[usize], len: usize) -> Vec<T> {
    assert!(len <= shape.len && data.len() == shape.elements());
    let (h, l, d) = (shape.heads, shape.len, shape.head_dim);
    let mut out = Vec::with_capacity(rows.len() * h * len * d);
    for &r in rows {
        assert!(r < shape.batch);
        for head in 0..h {
            let start = ((r * h + head) * l + (l - len)) * d;
            out.extend_from_slice(&data[start..start + len * d]);
        }
    }
    out
}

/// Reorders rows `start..start + perm.len()` in place: row `start + j`
/// becomes a copy of row `start + perm[j]` (beam search). Other rows are
/// untouched. Returns the bytes written.
pub fn reorder<T: Copy>(data: &mut [T], shape: KvShape, start: usize, perm: &[usize]) -> usize {
    let row = shape.heads * shape.len * shape.head_dim;
    let group = &mut data[start * row..(start + perm.len()) * row];
    let before = group.to_vec();
    for (j, &p) in perm.iter().enumerate() {
        if p != j {
            group[j * row..(j + 1) * row].copy_from_slice(&before[p * row..(p + 1) * row]);
        }
    }
    perm.iter().enumerate().filter(|(j, p)| j != *p).count() * row * std::mem::size_of::<T>()
}

/// Stacks `a` over `b` along the batch, each left-padded with zeros to `len`.
pub fn concat<T: Copy + Default>(a: &[T], a_shape: KvShape, b: &[T], b_shape: KvShape, len: usize) -> Vec<T> {
    assert!(a_shape.heads == b_shape.heads && a_shape.head_dim == b_shape.head_dim);
    assert!(len >= a_shape.len && len >= b_shape.len);
    let (h, d) = (a_shape.heads, a_shape.head_dim);
    let mut out = Vec::with_capacity((a_shape.batch + b_shape.batch) * h * len * d);
    for (data, shape) in [(a, a_shape), (b, b_shape)] {
        assert_eq!(data.len(), shape.elements());
        let (pad, row) = ((len - shape.len) * d, shape.len * d);
        for block in 0..shape.batch * h {
            out.extend(std::iter::repeat_n(T::default(), pad));
            out.extend_from_slice(&data[block * row..(block + 1) * row]);
        }
    }
    out
}

/// The attention mask of a left-padded batch: row `r` has `lens[r]` real
/// tokens right-aligned in `width` columns.
pub fn attention_mask(lens: &[usize], width: usize) -> Vec<i64> {
    let mut mask = Vec::with_capacity(lens.len() * width);
    for &n in lens {
        mask.extend(std::iter::repeat_n(0, width - n));
        mask.extend(std::iter::repeat_n(1, n));
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, len: usize) -> KvShape {
        KvShape { batch, heads: 2, len, head_dim: 3 }
    }

    /// Value at [b, h, l, d] encodes its own coordinates.
    fn tensor(s: KvShape, tag: usize) -> Vec<u32> {
        let mut v = Vec::new();
        for b in 0..s.batch {
            for h in 0..s.heads {
                for l in 0..s.len {
                    for d in 0..s.head_dim {
                        v.push((tag * 10000 + b * 1000 + h * 100 + l * 10 + d) as u32);
                    }
                }
            }
        }
        v
    }

    fn at(v: &[u32], s: KvShape, b: usize, h: usize, l: usize, d: usize) -> u32 {
        v[((b * s.heads + h) * s.len + l) * s.head_dim + d]
    }

    #[test]
    fn select_keeps_rows_in_order_and_trims_leading_columns() {
        let s = shape(3, 4);
        let t = tensor(s, 0);
        let out = select(&t, s, &[2, 0], 2);
        let o = KvShape { batch: 2, len: 2, ..s };
        assert_eq!(out.len(), o.elements());
        assert_eq!(at(&out, o, 0, 1, 0, 2), at(&t, s, 2, 1, 2, 2));
        assert_eq!(at(&out, o, 1, 0, 1, 0), at(&t, s, 0, 0, 3, 0));
    }

    #[test]
    fn concat_left_pads_both_sides_to_the_common_length() {
        let (sa, sb) = (shape(2, 3), shape(1, 5));
        let (a, b) = (tensor(sa, 1), tensor(sb, 2));
        let out = concat(&a, sa, &b, sb, 5);
        let o = shape(3, 5);
        assert_eq!(out.len(), o.elements());
        assert_eq!(at(&out, o, 1, 1, 0, 0), 0, "padding");
        assert_eq!(at(&out, o, 1, 1, 1, 2), 0, "padding");
        assert_eq!(at(&out, o, 1, 1, 2, 2), at(&a, sa, 1, 1, 0, 2));
        assert_eq!(at(&out, o, 1, 0, 4, 1), at(&a, sa, 1, 0, 2, 1));
        assert_eq!(at(&out, o, 2, 1, 0, 0), at(&b, sb, 0, 1, 0, 0));
    }

    #[test]
    fn concat_with_an_empty_cache_is_all_padding() {
        let (sa, sb) = (shape(1, 0), shape(1, 2));
        let out = concat(&[], sa, &tensor(sb, 3), sb, 2);
        let o = shape(2, 2);
        assert!(out[..o.elements() / 2].iter().all(|&x| x == 0));
    }

    #[test]
    fn reorder_touches_only_the_group() {
        let s = shape(4, 2);
        let t = tensor(s, 0);
        let mut r = t.clone();
        reorder(&mut r, s, 1, &[1, 1, 0]);
        assert_eq!(at(&r, s, 0, 1, 1, 2), at(&t, s, 0, 1, 1, 2));
        assert_eq!(at(&r, s, 1, 1, 1, 2), at(&t, s, 2, 1, 1, 2));
        assert_eq!(at(&r, s, 2, 0, 0, 0), at(&t, s, 2, 0, 0, 0));
        assert_eq!(at(&r, s, 3, 1, 0, 1), at(&t, s, 1, 1, 0, 1));
    }

    #[test]
    fn masks_right_align_real_tokens() {
        assert_eq!(attention_mask(&[2, 4, 0], 4), vec![0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]);
    }
}
