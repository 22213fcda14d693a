using System.Diagnostics;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Qcow2;

/// <summary>qemu-img and qemu-io (Debian's qemu-utils), which make and read the images the qcow2 tests check against.</summary>
internal static class Qemu
{
    public const string Img = "/usr/bin/qemu-img";
    public const string Io = "/usr/bin/qemu-io";

    /// <summary>Runs qemu-img with a time bound and returns its stdout; fails the test on a non-zero exit.</summary>
    public static string RunImg(params string[] args) => RunOk(Img, args);

    /// <summary>qemu-io on <paramref name="image"/> (format <paramref name="format"/>) with each command as a -c.</summary>
    public static void RunIo(string image, string format, params string[] commands)
    {
        var args = new List<string> { "-f", format };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(image);
        var output = RunOk(Io, args);
        Assert.False(output.Contains("failed", StringComparison.OrdinalIgnoreCase), $"qemu-io {string.Join(' ', args)}: {output}");
    }

    /// <summary>A new qcow2 image; <paramref name="options"/> go to -o (cluster_size=..., compat=..., extended_l2=on).</summary>
    public static string Create(string path, string size, string options = "", string? backing = null, string backingFormat = "qcow2")
    {
        var args = new List<string> { "create", "-q", "-f", "qcow2" };
        if (options.Length > 0)
        {
            args.Add("-o");
            args.Add(options);
        }
        if (backing is not null)
        {
            args.AddRange(["-b", backing, "-F", backingFormat]);
        }
        args.Add(path);
        args.Add(size);
        RunOk(Img, args);
        return path;
    }

    /// <summary>What qemu reads from the image (or a snapshot of it): qemu-img convert -O raw.</summary>
    public static byte[] ReadRaw(string image, string? snapshot = null)
    {
        var raw = image + $".{Guid.NewGuid():N}.raw";
        var args = new List<string> { "convert", "-O", "raw" };
        if (snapshot is not null)
        {
            args.AddRange(["-l", $"snapshot.name={snapshot}"]);
        }
        args.AddRange([image, raw]);
        RunOk(Img, args);
        try
        {
            return File.ReadAllBytes(raw);
        }
        finally
        {
            File.Delete(raw);
        }
    }

    public static string RunOk(string file, IEnumerable<string> args)
    {
        var (code, stdout, output) = Run(file, args);
        Assert.True(code == 0, $"{file} {string.Join(' ', args)} exited {code}: {output}");
        return stdout;
    }

    /// <summary>Runs a program with a 60 s bound: its exit code, stdout, and stdout with stderr.</summary>
    public static (int Code, string Stdout, string Output) Run(string file, IEnumerable<string> args)
    {
        if (!File.Exists(file))
        {
            Assert.Fail($"{file} is missing: install Debian's qemu-utils (./test.sh does)");
        }
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(60)))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{file} {string.Join(' ', psi.ArgumentList)} did not finish within 60 s");
        }
        return (p.ExitCode, stdout.Result, stdout.Result + stderr.Result);
    }
}

/// <summary>Reads a whole target in awkward pieces and compares it with what qemu reads.</summary>
internal static class Qcow2Reads
{
    // Sizes that cross cluster and subcluster boundaries at every cluster size the tests use.
    private static readonly int[] Chunks = [512, 4096, 3 * 512, 65536 + 512, 1 << 20, 7 * 512, 131072, 1000, 2 << 20];

    /// <summary>Reads all of <paramref name="target"/> in varied chunks (some unaligned), then random pieces, and compares each with <paramref name="expected"/>.</summary>
    public static void MatchesQemu(BlockTarget target, byte[] expected, int seed = 1)
    {
        Assert.Equal(expected.Length, target.Size);
        var got = new byte[expected.Length];
        long offset = 0;
        for (var i = 0; offset < got.Length; i++)
        {
            var n = (int)Math.Min(Chunks[i % Chunks.Length], got.Length - offset);
            var r = target.Read(got.AsSpan((int)offset, n), offset);
            Assert.True(r == n, $"read of {n} at {offset} returned {r}");
            offset += n;
        }
        AssertSame(expected, got, "sequential reads");
        var rng = new Random(seed);
        var buf = new byte[3 << 20];
        for (var i = 0; i < 200; i++)
        {
            var start = rng.NextInt64(expected.Length);
            var n = (int)Math.Min(rng.Next(1, i % 10 == 0 ? buf.Length : 70000), expected.Length - start);
            var r = target.Read(buf.AsSpan(0, n), start);
            Assert.True(r == n, $"read of {n} at {start} returned {r}");
            if (!buf.AsSpan(0, n).SequenceEqual(expected.AsSpan((int)start, n)))
            {
                AssertSame(expected.AsSpan((int)start, n).ToArray(), buf.AsSpan(0, n).ToArray(), $"read of {n} at {start}");
            }
        }
    }

    public static void AssertSame(byte[] expected, byte[] got, string what)
    {
        var i = expected.AsSpan().CommonPrefixLength(got);
        Assert.True(i == expected.Length && got.Length == expected.Length,
            $"{what}: first difference at byte {i} (expected 0x{(i < expected.Length ? expected[i] : 0):x2}, got 0x{(i < got.Length ? got[i] : 0):x2})");
    }
}
