using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>The loop target's synchronous methods, on a real file.</summary>
public class LoopTargetTests
{
    private const int MiB = 1 << 20;

    internal static byte[] Pattern(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        b.AsSpan().Replace((byte)0, (byte)1); // no zeros, so zeros read back were made by the test
        return b;
    }

    /// <summary>A file full of <paramref name="data"/>, written through and synced so its blocks are allocated.</summary>
    internal static TempFile FileWith(byte[] data, string? directory = null)
    {
        var file = new TempFile(0, directory);
        File.WriteAllBytes(file.Path, data);
        using (var fs = new FileStream(file.Path, FileMode.Open, FileAccess.ReadWrite))
        {
            fs.Flush(flushToDisk: true);
        }
        return file;
    }

    internal static byte[] Slice(string path, long offset, int length)
    {
        var b = new byte[length];
        using var h = File.OpenHandle(path);
        Assert.Equal(length, RandomAccess.Read(h, b, offset));
        return b;
    }

    [Fact]
    public void FileStatHelperAgreesWithStat()
    {
        using var file = FileWith(Pattern(3 * MiB, 1));
        var psi = new ProcessStartInfo("stat", ["-c", "%s %b %B", file.Path]) { RedirectStandardOutput = true };
        using var p = Process.Start(psi)!;
        var fields = p.StandardOutput.ReadToEnd().Trim().Split(' ').Select(long.Parse).ToArray();
        p.WaitForExit();
        Assert.Equal(fields[0], FileStat.Size(file.Path));
        Assert.Equal(fields[1] * fields[2], FileStat.AllocatedBytes(file.Path));
        Assert.True(FileStat.AllocatedBytes(file.Path) >= 3 * MiB);
    }

    [Fact]
    public void DescribesItself()
    {
        using var file = new TempFile(MiB);
        using var t = new LoopTarget(file.Path);
        Assert.Equal(MiB, t.Size);
        Assert.Equal("loop", t.Kind);
        Assert.Equal(file.Path, t.Path);
        Assert.False(t.IsBlockDevice);
        Assert.False(t.DirectIo);
        Assert.False(t.IsReadOnly);
        Assert.True(t.HasVolatileCache);
        Assert.True(t.HasNativeFua);
        Assert.True(t.CanDiscard);
        Assert.True(t.CanWriteZeroes);
        Assert.Equal(new Dictionary<string, string> { ["file"] = file.Path, ["direct-io"] = "off", ["read-only"] = "off" }, t.Recipe);
    }

    [Theory]
    [InlineData(512L, 512L)]
    [InlineData(513L, 512L)]
    [InlineData(1023L, 512L)]
    [InlineData(MiB + 700L, MiB + 512L)]
    [InlineData((3L << 30) + 4095, (3L << 30) + 3584)]
    public void SizeIsTheFileRoundedDownToASector(long fileBytes, long expected)
    {
        using var file = new TempFile(fileBytes);
        using var t = new LoopTarget(file.Path);
        Assert.Equal(expected, t.Size);
    }

    [Fact]
    public void RefusesWhatIsNotADisk()
    {
        using var small = new TempFile(100);
        Assert.Equal($"{small.Path} is 100 bytes: a loop device needs at least 512", Assert.Throws<ArgumentException>(() => new LoopTarget(small.Path)).Message);
        var dir = Path.GetTempPath().TrimEnd('/');
        Assert.Equal($"{dir} is a directory, not a file or block device", Assert.Throws<ArgumentException>(() => new LoopTarget(dir)).Message);
        var missing = Path.Combine(Path.GetTempPath(), $"ublksharp-test-missing-{Guid.NewGuid():N}");
        Assert.Equal(Errno.ENOENT, Assert.Throws<ErrnoException>(() => new LoopTarget(missing)).Errno);
    }

    [Fact]
    public void ReadsWritesAndFlushes()
    {
        using var file = new TempFile(4 * MiB);
        using var t = new LoopTarget(file.Path);
        var data = Pattern(192 * 1024, 2);
        Assert.Equal(data.Length, t.Write(data, MiB + 512));
        Assert.Equal(0, t.Flush());
        Assert.Equal(data, Slice(file.Path, MiB + 512, data.Length));

        var back = new byte[data.Length + 1024];
        Assert.Equal(back.Length, t.Read(back, MiB));
        Assert.All(back.AsSpan(0, 512).ToArray(), x => Assert.Equal(0, x));
        Assert.Equal(data, back.AsSpan(512, data.Length).ToArray());
        Assert.All(back.AsSpan(512 + data.Length).ToArray(), x => Assert.Equal(0, x));

        Assert.Equal(4096, t.WriteFua(data.AsSpan(0, 4096), 0));
        Assert.Equal(data.AsSpan(0, 4096).ToArray(), Slice(file.Path, 0, 4096));
        Assert.Equal(4 * MiB, new FileInfo(file.Path).Length);
    }

    [Fact]
    public void QueuesUseTheRingExceptOnMemoryFileSystems()
    {
        Assert.SkipUnless(Directory.Exists("/dev/shm"), "no /dev/shm");
        using var shm = new TempFile(MiB, "/dev/shm");
        using (var auto = new LoopTarget(shm.Path))
        {
            // tmpfs: io_uring would hand every request to a worker thread.
            Assert.False(auto.UsesRing);
            Assert.Null(auto.CreateUringBackend(0));
        }
        using (var ring = new LoopTarget(shm.Path, io: LoopIo.Ring))
        {
            Assert.True(ring.UsesRing);
            using var backend = ring.CreateUringBackend(0);
            Assert.NotNull(backend);
        }
        using var file = new TempFile(MiB);
        using var sync = new LoopTarget(file.Path, io: LoopIo.Sync);
        Assert.False(sync.UsesRing);
        Assert.Null(sync.CreateUringBackend(0));
    }

    [Fact]
    public unsafe void DirectIoServesUnalignedBuffers()
    {
        var data = Pattern(64 * 1024, 6);
        using var file = FileWith(new byte[MiB]);
        LoopTarget t;
        try
        {
            t = new LoopTarget(file.Path, directIo: true);
        }
        catch (ErrnoException e) when (e.Errno == Errno.EINVAL)
        {
            Assert.Skip($"{Path.GetTempPath()} does not take O_DIRECT");
            return;
        }
        using (t)
        {
            // O_DIRECT refuses memory that is not block-aligned: an NBD export's buffers are managed arrays.
            var block = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(128 * 1024, 4096);
            try
            {
                var unaligned = new Span<byte>(block + 8, data.Length);
                data.CopyTo(unaligned);
                Assert.Equal(data.Length, t.Write(unaligned, 4096));
                Assert.Equal(4096, t.WriteFua(unaligned[..4096], 128 * 1024));
                unaligned.Clear();
                Assert.Equal(data.Length, t.Read(unaligned, 4096));
                Assert.Equal(data, unaligned.ToArray());
            }
            finally
            {
                System.Runtime.InteropServices.NativeMemory.AlignedFree(block);
            }
            Assert.Equal(data, Slice(file.Path, 4096, data.Length));
            Assert.Equal(data.AsSpan(0, 4096).ToArray(), Slice(file.Path, 128 * 1024, 4096));
        }
    }

    [Fact]
    public void DiscardPunchesAHoleThatReadsAsZeros()
    {
        var data = Pattern(4 * MiB, 3);
        using var file = FileWith(data);
        using var t = new LoopTarget(file.Path);
        var before = FileStat.AllocatedBytes(file.Path);
        Assert.True(before >= 4 * MiB, $"{before} bytes allocated");

        Assert.Equal(0, t.Discard(MiB, 2 * MiB));

        Assert.True(FileStat.AllocatedBytes(file.Path) <= before - (2 * MiB), $"{before} -> {FileStat.AllocatedBytes(file.Path)} bytes allocated");
        Assert.Equal(4 * MiB, FileStat.Size(file.Path)); // KEEP_SIZE
        var expected = (byte[])data.Clone();
        Array.Clear(expected, MiB, 2 * MiB);
        var back = new byte[4 * MiB];
        Assert.Equal(back.Length, t.Read(back, 0));
        Assert.Equal(expected, back);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void WriteZeroesReadsAsZerosAndUnmapsOnlyWhenAllowed(bool mayUnmap)
    {
        var data = Pattern(4 * MiB, 4);
        using var file = FileWith(data);
        using var t = new LoopTarget(file.Path);
        var before = FileStat.AllocatedBytes(file.Path);

        // Unaligned edges: the file system zeroes the partial blocks, whatever it does with the rest.
        const int offset = MiB - 512, length = (2 * MiB) + 1024;
        Assert.Equal(0, t.WriteZeroes(offset, length, mayUnmap));

        var after = FileStat.AllocatedBytes(file.Path);
        if (mayUnmap)
        {
            Assert.True(after <= before - (2 * MiB), $"{before} -> {after} bytes allocated");
        }
        else
        {
            Assert.True(after >= before, $"{before} -> {after} bytes allocated: NOUNMAP must keep the range allocated");
        }
        Assert.Equal(4 * MiB, FileStat.Size(file.Path));
        var expected = (byte[])data.Clone();
        Array.Clear(expected, offset, length);
        Assert.Equal(expected, File.ReadAllBytes(file.Path));
    }

    [Fact]
    public void ReadOnlyRefusesWrites()
    {
        var data = Pattern(MiB, 5);
        using var file = FileWith(data);
        using var t = new LoopTarget(file.Path, readOnly: true);
        Assert.True(t.IsReadOnly);
        Assert.False(t.CanDiscard);
        Assert.False(t.CanWriteZeroes);
        Assert.Equal("on", t.Recipe["read-only"]);

        Assert.Equal(-Errno.EROFS, t.Write(new byte[4096], 0));
        Assert.Equal(-Errno.EROFS, t.WriteFua(new byte[4096], 0));
        Assert.Equal(-Errno.EROFS, t.Discard(0, 4096));
        Assert.Equal(-Errno.EROFS, t.WriteZeroes(0, 4096, mayUnmap: true));
        Assert.Equal(-Errno.EROFS, t.WriteZeroes(0, 4096, mayUnmap: false));
        Assert.Equal(data, File.ReadAllBytes(file.Path));

        var back = new byte[MiB];
        Assert.Equal(MiB, t.Read(back, 0));
        Assert.Equal(data, back);
        Assert.Equal(0, t.Flush());
    }

    [Fact]
    public void DisposeClosesTheFile()
    {
        using var file = new TempFile(MiB);
        var t = new LoopTarget(file.Path);
        var fds = OpenFdsTo(file.Path);
        t.Dispose();
        Assert.Equal(fds - 1, OpenFdsTo(file.Path));
    }

    internal static int OpenFdsTo(string path)
        => new DirectoryInfo("/proc/self/fd").GetFiles().Count(f =>
        {
            try
            {
                return f.ResolveLinkTarget(false)?.FullName == path;
            }
            catch (IOException)
            {
                return false; // closed while listing
            }
        });
}
