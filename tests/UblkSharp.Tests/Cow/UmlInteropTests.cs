using System.Security.Cryptography;
using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

/// <summary>
/// The real User-Mode Linux (Debian's linux.uml, run as a plain process with the host's root as
/// its root) and this target on the same COW files, in both directions.
/// </summary>
public class UmlInteropTests
{
    private static string NewExt4(ScratchDir dir, string name, string size)
    {
        var path = dir.File(name);
        Uml.RunOk("/usr/bin/truncate", "-s", size, path);
        Uml.RunOk("/sbin/mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", path);
        return path;
    }

    private static string Sha256(byte[] data) => Convert.ToHexStringLower(SHA256.HashData(data));

    [Fact]
    public void UmlWritesWeReadMergeAndFsck()
    {
        Uml.Require(Uml.Linux, Uml.Moo);
        using var dir = new ScratchDir();
        var basePath = NewExt4(dir, "base.img", "64M");
        var overlay = dir.File("uml.cow");
        var mnt = dir.File("mnt");
        Directory.CreateDirectory(mnt);
        // UML creates the COW file itself (ubd0=COW,BASE with no COW file yet).
        var console = Uml.Boot(dir, $"{overlay},{basePath}", $"""
            mount -t ext4 /dev/ubda {mnt} || echo MOUNT-FAILED
            echo hello from uml > {mnt}/hello.txt
            mkdir -p {mnt}/dir/sub
            dd if=/dev/urandom of={mnt}/dir/sub/random.bin bs=64k count=40 2>/dev/null
            echo "SHA $(sha256sum < {mnt}/dir/sub/random.bin)"
            umount {mnt} && echo UMOUNT-OK
            """);
        Assert.DoesNotContain("MOUNT-FAILED", console, StringComparison.Ordinal);
        Assert.Contains("UMOUNT-OK", console, StringComparison.Ordinal);
        var sha = console.Split('\n').Single(l => l.StartsWith("SHA ", StringComparison.Ordinal))[4..].Split(' ')[0];

        var h = CowTarget.ReadHeader(overlay);
        Assert.Equal(3, h.Version);
        Assert.Equal(basePath, h.BackingFile);

        // Our target reads the disk UML wrote; as a plain image it fscks clean and has the files.
        var image = dir.File("ours.img");
        using (var t = new CowTarget(overlay, new CowOpenOptions { ReadOnly = true }))
        {
            Assert.True(t.CowSectors > 0);
            File.WriteAllBytes(image, CowFiles.ReadAll(t));
        }
        Uml.RunOk("/sbin/e2fsck", "-fn", image);
        Uml.RunOk("/sbin/debugfs", "-R", $"dump /hello.txt {dir.File("hello.out")}", image);
        Assert.Equal("hello from uml\n", File.ReadAllText(dir.File("hello.out")));
        Uml.RunOk("/sbin/debugfs", "-R", $"dump /dir/sub/random.bin {dir.File("random.out")}", image);
        Assert.Equal(sha, Sha256(File.ReadAllBytes(dir.File("random.out"))));

        // And cow merge of UML's file equals uml_moo's, byte for byte.
        Uml.RunOk(Uml.Moo, overlay, dir.File("moo.img"));
        CowMerge.Merge(overlay, dir.File("merge.img"));
        Assert.True(File.ReadAllBytes(dir.File("moo.img")).AsSpan().SequenceEqual(File.ReadAllBytes(dir.File("merge.img"))));
        Assert.True(File.ReadAllBytes(image).AsSpan().SequenceEqual(File.ReadAllBytes(dir.File("merge.img"))));
    }

    [Fact]
    public void WeWriteUmlReads()
    {
        Uml.Require(Uml.Linux, Uml.Moo);
        using var dir = new ScratchDir();
        var basePath = NewExt4(dir, "base.img", "64M");

        // The file system we want, made with debugfs on a copy of the base...
        var want = dir.File("want.img");
        File.Copy(basePath, want);
        var payload = new byte[3 << 20];
        new Random(77).NextBytes(payload);
        File.WriteAllBytes(dir.File("payload.bin"), payload);
        File.WriteAllText(dir.File("note.txt"), "written through the cow target\n");
        Uml.RunOk("/sbin/debugfs", "-w", "-R", "mkdir /ours", want);
        Uml.RunOk("/sbin/debugfs", "-w", "-R", $"write {dir.File("payload.bin")} /ours/payload.bin", want);
        Uml.RunOk("/sbin/debugfs", "-w", "-R", $"write {dir.File("note.txt")} /ours/note.txt", want);

        // ...reaches the overlay as writes through our target, block by block where it differs.
        var overlay = dir.File("ours.cow");
        CowTarget.CreateOverlay(overlay, basePath);
        var baseBytes = File.ReadAllBytes(basePath);
        var wantBytes = File.ReadAllBytes(want);
        using (var t = new CowTarget(overlay))
        {
            for (var off = 0; off < wantBytes.Length; off += 4096)
            {
                if (!wantBytes.AsSpan(off, 4096).SequenceEqual(baseBytes.AsSpan(off, 4096)))
                {
                    Assert.Equal(4096, t.Write(wantBytes.AsSpan(off, 4096), off));
                }
            }
            Assert.Equal(0, t.Flush());
        }

        // UML opens our COW file, mounts it and reads the files back. (Not e2fsck inside UML: Debian's
        // 6.1 UML misreads some multi-segment reads of COW devices, its own COW files too.)
        var mnt = dir.File("mnt");
        Directory.CreateDirectory(mnt);
        var console = Uml.Boot(dir, $"{overlay},{basePath}", $"""
            mount -t ext4 /dev/ubda {mnt} || echo MOUNT-FAILED
            echo "SHA $(sha256sum < {mnt}/ours/payload.bin)"
            echo "NOTE $(cat {mnt}/ours/note.txt)"
            umount {mnt}
            """);
        Assert.DoesNotContain("MOUNT-FAILED", console, StringComparison.Ordinal);
        Assert.Contains($"SHA {Sha256(payload)}", console, StringComparison.Ordinal);
        Assert.Contains("NOTE written through the cow target", console, StringComparison.Ordinal);

        // uml_moo merges our overlay (now also written by UML's mount) into what cow merge makes.
        Uml.RunOk(Uml.Moo, overlay, dir.File("moo.img"));
        CowMerge.Merge(overlay, dir.File("merge.img"));
        Assert.True(File.ReadAllBytes(dir.File("moo.img")).AsSpan().SequenceEqual(File.ReadAllBytes(dir.File("merge.img"))));
        Uml.RunOk("/sbin/e2fsck", "-fn", dir.File("merge.img"));
    }
}
