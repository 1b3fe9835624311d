//! Pack inputs beyond `.npy`: WebDataset tars (members grouped by key, one field per
//! extension, integer text parsed on request) and image folders (torchvision's layout,
//! labels and file order as torchvision gives them). Read back exactly; bad input is a
//! typed error naming the tar and sample or the class directory, with no plaintext in it
//! and no manifest left behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::Fixture;
use shardlock::{DatasetWriter, Error, FieldKind, InputFormat, InputSource, PackOptions};

/// Packs `path` as `format` into `name`; the manifest's metadata is the source's.
fn pack(fx: &Fixture, path: &Path, format: InputFormat, parse: &[&str], name: &str) -> shardlock::Result<PathBuf> {
    let parse: Vec<String> = parse.iter().map(|s| s.to_string()).collect();
    let src = InputSource::open(&[path.to_owned()], format, &parse)?;
    let out = fx.path(name);
    let mut opts = PackOptions::new(name);
    opts.shard_size = 40_000;
    opts.metadata = src.metadata();
    let mut w = DatasetWriter::create(&out, src.schema()?, opts, &*fx.keyring, &fx.issuer)?;
    src.write_into(&mut w, &mut |_| ())?;
    w.finish()?;
    Ok(out)
}

/// A tar of `(member name, bytes)`, with the entry types given (`None`: a regular file).
fn write_tar(path: &Path, members: &[(String, Vec<u8>, Option<tar::EntryType>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data, ty) in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty.unwrap_or(tar::EntryType::Regular));
        h.set_size(if ty.is_some() { 0 } else { data.len() as u64 });
        h.set_mode(0o644);
        // append_data writes a GNU long-name entry for names over 100 bytes.
        b.append_data(&mut h, name, if ty.is_some() { &[][..] } else { &data[..] }).unwrap();
    }
    b.finish().unwrap();
}

fn bytes(seed: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed * 17) % 251) as u8).collect()
}

#[test]
fn webdataset_tars_read_back_member_for_member() {
    let fx = Fixture::new();
    let dir = fx.path("wds");
    std::fs::create_dir(&dir).unwrap();
    let long = format!("{}/deep", "d".repeat(120));
    let mut want = Vec::new();
    for t in 0..2 {
        let mut members = vec![("train".to_string(), vec![], Some(tar::EntryType::Directory))];
        for i in 0..25 {
            let k = t * 25 + i;
            // Empty values, values spanning 16 KiB chunks, and a key past the 100-byte ustar name.
            let jpg = bytes(k, [0, 10, 20_000, 70_000][k % 4]);
            let key = if k == 7 { format!("{long}/{k:06}") } else { format!("train/{k:06}") };
            let json = format!("{{\"k\": {k}, \"name\": \"caf\u{e9} {k}\"}}").into_bytes();
            members.push((format!("{key}.jpg"), jpg.clone(), None));
            members.push((format!("{key}.cls"), format!(" {}\n", k % 10).into_bytes(), None));
            members.push((format!("{key}.json"), json.clone(), None));
            want.push(vec![((k % 10) as i64).to_le_bytes().to_vec(), jpg, json]);
        }
        members.push(("train/.DS_Store".into(), b"x".to_vec(), None));
        members.push(("README".into(), b"no extension".to_vec(), None));
        write_tar(&dir.join(format!("shard-{t:03}.tar")), &members);
    }
    std::fs::write(dir.join(".notes"), "hidden: not counted").unwrap();
    assert_eq!(InputFormat::detect(std::slice::from_ref(&dir)).unwrap(), InputFormat::WebDataset);
    let out = pack(&fx, &dir, InputFormat::Auto, &["cls"], "wds-out").unwrap();
    let ds = fx.open(&out).unwrap();
    let names: Vec<&str> = ds.manifest().schema.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["cls", "jpg", "json"], "one field per extension, sorted");
    assert!(matches!(ds.manifest().schema.fields[0].kind, FieldKind::Tensor { .. }), "cls parsed to i64");
    assert_eq!(fx.read_all(&out).unwrap(), want);

    // Without --parse every extension is bytes, as stored.
    let out = pack(&fx, &dir.join("shard-001.tar"), InputFormat::WebDataset, &[], "raw").unwrap();
    let got = fx.read_all(&out).unwrap();
    assert_eq!(got.len(), 25);
    assert_eq!(got[0][0], b" 5\n".to_vec());

    // Tars among other files: which one is meant is asked, no file silently left out.
    std::fs::write(dir.join("notes.txt"), "not a tar").unwrap();
    let e = pack(&fx, &dir, InputFormat::Auto, &[], "mixed").unwrap_err().to_string();
    assert!(e.contains("1 other file(s)") && e.contains("--format"), "{e}");
    assert!(pack(&fx, &dir, InputFormat::WebDataset, &["cls"], "mixed").is_ok());
}

#[test]
fn bad_webdataset_input_names_the_tar_and_sample_and_leaves_no_dataset() {
    let fx = Fixture::new();
    let tar = fx.path("a.tar");
    let fail = |members: &[(String, Vec<u8>, Option<tar::EntryType>)], parse: &[&str], want: &str| {
        write_tar(&tar, members);
        let e = pack(&fx, &tar, InputFormat::WebDataset, parse, "bad").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Input { .. }), "{e:?}");
        assert!(msg.contains("a.tar") && msg.contains(want), "{msg}");
        assert!(!fx.path("bad").join("manifest.json").exists());
        msg
    };
    let m = |n: &str, v: &[u8]| (n.to_string(), v.to_vec(), None);
    fail(&[m("k1.jpg", b"x"), m("k1.cls", b"1"), m("k2.jpg", b"y")], &[], r#"sample "k2": has extensions ["jpg"]"#);
    let msg = fail(&[m("k1.jpg", b"x"), m("k1.cls", b"secret-label")], &["cls"], r#"sample "k1": .cls (12 bytes)"#);
    assert!(!msg.contains("secret-label"), "plaintext never goes into an error: {msg}");
    fail(&[m("k1.jpg", b"x"), m("k1.jpg", b"y")], &[], "two members with extension \"jpg\"");
    fail(&[m("k1.jpg", b"x")], &["cls"], "--parse names \"cls\"");
    fail(&[m("README", b"x")], &[], "no samples");
    let link = vec![m("k1.jpg", b"x"), ("k1.cls".to_string(), vec![], Some(tar::EntryType::Link))];
    fail(&link, &[], "is a Link entry");
    // A corrupt header is sample bytes: the error names the tar, never quotes them.
    let mut junk = b"secret-sample-".repeat(40);
    junk[100..108].copy_from_slice(b"NOTOCTAL");
    std::fs::write(&tar, &junk).unwrap();
    let e = pack(&fx, &tar, InputFormat::WebDataset, &[], "bad").unwrap_err().to_string();
    assert!(e.contains("a.tar") && e.contains("not a readable tar file"), "{e}");
    assert!(!e.contains("secret") && !e.contains("NOTOCTAL"), "{e}");
    // A header claiming more bytes than the tar holds.
    write_tar(&tar, &[m("k1.jpg", &[7u8; 2000])]);
    let mut bytes = std::fs::read(&tar).unwrap();
    bytes.truncate(512 + 1024);
    std::fs::write(&tar, &bytes).unwrap();
    let e = pack(&fx, &tar, InputFormat::WebDataset, &[], "bad").unwrap_err().to_string();
    assert!(e.contains("claims 2000 bytes"), "{e}");
    let empty = fx.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = pack(&fx, &empty, InputFormat::WebDataset, &[], "bad").unwrap_err().to_string();
    assert!(e.contains("no .tar files"), "{e}");
}

#[test]
fn image_folders_get_torchvision_labels_order_and_signed_class_names() {
    let fx = Fixture::new();
    let root = fx.path("imgs");
    let mut files: Vec<(PathBuf, i64)> = Vec::new();
    for (c, label) in [("cat", 0), ("dog", 1), ("zebra", 2)] {
        // Directory order as Python's sorted(os.walk()): "a" < "a-b" < "a/x".
        for sub in ["", "a", "a-b", "a/x"] {
            let d = root.join(c).join(sub);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["02.JPG", "01.png"] {
                files.push((d.join(f), label));
            }
            std::fs::write(d.join("notes.txt"), "not an image").unwrap();
            std::fs::write(d.join("anim.gif"), "not in torchvision's list").unwrap();
            // torchvision skips no hidden name: neither does the pack.
            files.push((d.join(".hidden.jpeg"), label));
        }
    }
    let order = |p: &Path| p.parent().unwrap().to_string_lossy().into_owned();
    files.sort_by(|a, b| (a.1, order(&a.0), a.0.file_name()).cmp(&(b.1, order(&b.0), b.0.file_name())));
    for (i, (f, _)) in files.iter().enumerate() {
        std::fs::write(f, bytes(i, 100 + i * 997)).unwrap();
    }
    let want: Vec<Vec<Vec<u8>>> =
        files.iter().map(|(f, l)| vec![std::fs::read(f).unwrap(), l.to_le_bytes().to_vec()]).collect();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("empty/readme.txt"), "x").unwrap();
    let e = pack(&fx, &root, InputFormat::Auto, &[], "bad").unwrap_err();
    assert!(e.to_string().contains("class directory \"empty\" holds no image file"), "{e}");
    std::fs::remove_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join(".DS_Store"), "x").unwrap();

    assert_eq!(InputFormat::detect(std::slice::from_ref(&root)).unwrap(), InputFormat::ImageFolder);
    let out = pack(&fx, &root, InputFormat::Auto, &[], "imgs-out").unwrap();
    assert_eq!(fx.read_all(&out).unwrap(), want);
    let m = fx.open(&out).unwrap().manifest().clone();
    assert_eq!(m.classes().unwrap(), ["cat", "dog", "zebra"]);
    // A folder of files is still the `files` input.
    assert_eq!(InputFormat::detect(&[root.join("cat/a/x")]).unwrap(), InputFormat::Files);
    // A link to a directory is followed (os.walk(followlinks=True)); one back up is refused.
    std::os::unix::fs::symlink(root.join("cat"), root.join("dog/up")).unwrap();
    let linked = pack(&fx, &root, InputFormat::Auto, &[], "linked").unwrap();
    let cats = files.iter().filter(|f| f.1 == 0).count() as u64;
    assert_eq!(fx.open(&linked).unwrap().manifest().records, files.len() as u64 + cats, "dog/up walks cat again");
    std::fs::remove_file(root.join("dog/up")).unwrap();
    std::os::unix::fs::symlink(root.join("dog"), root.join("dog/a/back")).unwrap();
    let e = pack(&fx, &root, InputFormat::Auto, &[], "loop2").unwrap_err().to_string();
    assert!(e.contains("loops back"), "{e}");
}
