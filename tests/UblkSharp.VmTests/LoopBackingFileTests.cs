namespace UblkSharp.VmTests;

/// <summary>
/// The loop target and its backing file (on /tmp, a tmpfs, which can punch holes): writes land at
/// the right offsets, discard punches holes (PUNCH_HOLE|KEEP_SIZE), write-zeroes without NOUNMAP
/// punches holes too (as the kernel's loop driver), and zeroed ranges read back as zeros.
/// </summary>
[Trait("boot", "shared")]
public class LoopBackingFileTests
{
    private const string Image = "/tmp/ublksharp-backing.img";
    private const long ImageSize = 64 << 20;

    [Fact]
    public void WritesLandInTheBackingFile()
    {
        VmEnvironment.RequireDriver();
        CreateImage();
        var big = Pattern(16 << 20, 1);
        var small = Pattern(3 * 512, 2);
        var tail = Pattern(128 << 10, 3);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2");
            DirectIo.Write(dev, 8 << 20, big);
            DirectIo.Write(dev, 512, small);                    // 512-byte sectors, not pages
            DirectIo.Write(dev, ImageSize - tail.Length, tail); // the very end of the device
            Assert.Equal(small, DirectIo.Read(dev, 512, small.Length));
            CliDevices.Del(CliDevices.IdOf(dev));

            var file = File.ReadAllBytes(Image);
            Assert.Equal(ImageSize, file.LongLength);
            var expected = new byte[ImageSize];
            big.CopyTo(expected, 8 << 20);
            small.CopyTo(expected, 512);
            tail.CopyTo(expected, ImageSize - tail.Length);
            AssertSame(expected, file, "the backing file after del");
        }
        finally
        {
            CliDevices.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public void DiscardAndWriteZeroesLeaveZerosAndHoles()
    {
        VmEnvironment.RequireDriver();
        CreateImage();
        var data = Pattern(32 << 20, 4);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2");
            // On tmpfs, data moves in one copy between the file's mapping and the request.
            Assert.Contains("USER_COPY", CliDevices.List()[CliDevices.IdOf(dev)].GetProperty("flags").GetString(), StringComparison.Ordinal);
            DirectIo.Write(dev, 0, data);
            var full = AllocatedBytes();
            Assert.True(full >= data.Length, $"the backing file has {full} bytes allocated after {data.Length} were written");

            // Discard: a hole, the size unchanged, zeros where the data was, the neighbours intact.
            VmEnvironment.ShOk($"blkdiscard -o {4 << 20} -l {8 << 20} {dev}");
            var afterDiscard = AllocatedBytes();
            Assert.True(full - afterDiscard >= 8 << 20, $"discard of 8 MiB freed {full - afterDiscard} bytes of the backing file");
            Assert.Equal(ImageSize, new FileInfo(Image).Length);

            // Write-zeroes that may unmap (fallocate --punch-hole on the device): a hole as well.
            VmEnvironment.ShOk($"fallocate --punch-hole -o {16 << 20} -l {4 << 20} {dev}");
            var afterPunch = AllocatedBytes();
            Assert.True(afterDiscard - afterPunch >= 4 << 20, $"write-zeroes (unmap) of 4 MiB freed {afterDiscard - afterPunch} bytes");

            // Write-zeroes with NOUNMAP (BLKZEROOUT): zeros, whatever the allocation.
            VmEnvironment.ShOk($"blkdiscard --zeroout -o {24 << 20} -l {2 << 20} {dev}");

            var expected = (byte[])data.Clone();
            Array.Clear(expected, 4 << 20, 8 << 20);
            Array.Clear(expected, 16 << 20, 4 << 20);
            Array.Clear(expected, 24 << 20, 2 << 20);
            var beforeRead = AllocatedBytes();
            AssertSame(expected, DirectIo.Read(dev, 0, data.Length), "the device after discard and write-zeroes");
            // Reading holes must not fill them (as a read through a tmpfs mapping would).
            Assert.True(AllocatedBytes() <= beforeRead, $"reading the device grew the backing file from {beforeRead} to {AllocatedBytes()} allocated bytes");
            CliDevices.Del(CliDevices.IdOf(dev));

            using var file = File.OpenRead(Image);
            var back = new byte[data.Length];
            file.ReadExactly(back);
            AssertSame(expected, back, "the backing file after discard and write-zeroes");
            Assert.Equal(ImageSize, new FileInfo(Image).Length);
        }
        finally
        {
            CliDevices.CleanUp();
            File.Delete(Image);
        }
    }

    private static void CreateImage()
    {
        using var f = File.Create(Image);
        f.SetLength(ImageSize);
    }

    private static byte[] Pattern(int length, int seed)
    {
        var data = new byte[length];
        new Random(seed).NextBytes(data);
        return data;
    }

    /// <summary>The backing file's allocated bytes (st_blocks in units of %B).</summary>
    private static long AllocatedBytes()
    {
        var parts = VmEnvironment.ShOk($"stat -c '%b %B' {Image}").Split(' ', StringSplitOptions.TrimEntries);
        return long.Parse(parts[0], System.Globalization.CultureInfo.InvariantCulture) * long.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture);
    }

    /// <summary>Equal contents, or the first differing offset (Assert.Equal on megabytes prints nothing useful).</summary>
    private static void AssertSame(byte[] expected, byte[] actual, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        var diff = expected.AsSpan().CommonPrefixLength(actual);
        if (diff != expected.Length)
        {
            Assert.Fail($"{what}: first difference at byte {diff} (0x{diff:x}): expected {expected[diff]:x2}, got {actual[diff]:x2}");
        }
    }
}
