using System.Security.Cryptography;

namespace UblkSharp.VmTests;

/// <summary>
/// ext4 on devices served by CLI daemons: mkfs, a tree of real files and random data, a clean
/// e2fsck, and every file's checksum after a remount (and, for loop, after a new daemon).
/// </summary>
[Trait("boot", "shared")]
public class CliFileSystemTests
{
    [Fact]
    public void LoopDeviceKeepsAnExt4FileSystemAcrossDaemons()
    {
        VmEnvironment.RequireDriver();
        const string image = "/tmp/ublksharp-fs-loop.img";
        const string mnt = "/tmp/ublksharp-fs-loop";
        Directory.CreateDirectory(mnt);
        using (var f = File.Create(image))
        {
            f.SetLength(256 << 20);
        }
        try
        {
            var dev = CliDevices.Add($"-t loop -f {image} -q 2");
            var sums = MakeFileSystemAndCheck(dev, mnt);
            CliDevices.Del(CliDevices.IdOf(dev));

            // The backing file alone holds a clean file system...
            VmEnvironment.ShOk($"e2fsck -fn {image}");
            // ...which a new daemon serves again, every file intact.
            dev = CliDevices.Add($"-t loop -f {image} -q 2");
            VmEnvironment.ShOk($"mount -o ro {dev} {mnt}");
            VerifyTree(mnt, sums);
            VmEnvironment.ShOk($"umount {mnt}");
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp(mnt);
            File.Delete(image);
        }
    }

    [Fact]
    public void MemoryDeviceKeepsAnExt4FileSystem()
    {
        VmEnvironment.RequireDriver();
        const string mnt = "/tmp/ublksharp-fs-mem";
        Directory.CreateDirectory(mnt);
        try
        {
            var dev = CliDevices.Add("-t mem --size 256M -q 2");
            MakeFileSystemAndCheck(dev, mnt);
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp(mnt);
        }
    }

    /// <summary>mkfs, mount, write the tree, umount, e2fsck -fn, mount again and verify it; returns the checksums.</summary>
    private static Dictionary<string, string> MakeFileSystemAndCheck(string dev, string mnt)
    {
        VmEnvironment.ShOk($"mkfs.ext4 -q -F {dev}");
        VmEnvironment.ShOk($"mount {dev} {mnt}");
        var sums = WriteTree(mnt);
        VmEnvironment.ShOk($"umount {mnt}");
        var (code, output) = VmEnvironment.Sh($"e2fsck -fn {dev}");
        Assert.True(code == 0, $"e2fsck -fn {dev} exited {code}:\n{output}");
        VmEnvironment.ShOk($"mount {dev} {mnt}");
        VerifyTree(mnt, sums);
        VmEnvironment.ShOk($"umount {mnt}");
        return sums;
    }

    /// <summary>
    /// Copies /usr/share/doc directories (real names, sizes and nesting; about 4 MiB) and writes a few
    /// MiB of random data; returns each file's SHA-256 by path relative to <paramref name="root"/>.
    /// </summary>
    private static Dictionary<string, string> WriteTree(string root)
    {
        var sums = new Dictionary<string, string>(StringComparer.Ordinal);
        long copied = 0;
        foreach (var dir in Directory.GetDirectories("/usr/share/doc").Order(StringComparer.Ordinal))
        {
            if (copied > 4 << 20)
            {
                break;
            }
            copied += CopyTree(dir, Path.Combine(root, "doc", Path.GetFileName(dir)), root, sums);
        }
        Assert.True(sums.Count > 20, $"only {sums.Count} files copied from /usr/share/doc");

        var random = new Random(20240611);
        foreach (var (name, size) in new[] { ("random/a.bin", 1 << 20), ("random/b.bin", 3 << 20), ("random/deep/c/d/e.bin", 777_777), ("random/one-byte", 1) })
        {
            var data = new byte[size];
            random.NextBytes(data);
            var path = Path.Combine(root, name);
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            File.WriteAllBytes(path, data);
            sums[name] = Convert.ToHexString(SHA256.HashData(data));
        }
        VmEnvironment.Log($"wrote {sums.Count} files, {(copied + (5 << 20)) >> 20} MiB");
        return sums;
    }

    private static long CopyTree(string from, string to, string root, Dictionary<string, string> sums)
    {
        long bytes = 0;
        Directory.CreateDirectory(to);
        foreach (var file in new DirectoryInfo(from).EnumerateFiles())
        {
            if (file.LinkTarget is not null)
            {
                continue;
            }
            var data = File.ReadAllBytes(file.FullName);
            var target = Path.Combine(to, file.Name);
            File.WriteAllBytes(target, data);
            sums[Path.GetRelativePath(root, target)] = Convert.ToHexString(SHA256.HashData(data));
            bytes += data.Length;
        }
        foreach (var dir in new DirectoryInfo(from).EnumerateDirectories())
        {
            if (dir.LinkTarget is null)
            {
                bytes += CopyTree(dir.FullName, Path.Combine(to, dir.Name), root, sums);
            }
        }
        return bytes;
    }

    private static void VerifyTree(string root, Dictionary<string, string> sums)
    {
        var files = Directory.GetFiles(root, "*", SearchOption.AllDirectories)
            .Select(f => Path.GetRelativePath(root, f))
            .Where(f => !f.StartsWith("lost+found", StringComparison.Ordinal))
            .ToHashSet(StringComparer.Ordinal);
        Assert.Equal(sums.Keys.Order(StringComparer.Ordinal), files.Order(StringComparer.Ordinal));
        foreach (var (name, sum) in sums)
        {
            Assert.True(sum == Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(Path.Combine(root, name)))), $"{name}: content differs after remount");
        }
    }
}
