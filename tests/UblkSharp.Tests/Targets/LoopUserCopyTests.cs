using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>
/// The loop target's one-copy path on tmpfs (USER_COPY): a regular file stands in for /dev/ublkcN,
/// whose user-copy offsets take pread/pwrite the same way. Data moves between the backing file's
/// mapping and the "request"; holes are never read through the mapping (that would allocate them).
/// </summary>
public sealed class LoopUserCopyTests
{
    private const int MiB = 1 << 20;
    private const long RequestPosition = 64 * 1024;

    private static TempFile? OnTmpfs(byte[] data)
    {
        if (!Directory.Exists("/dev/shm"))
        {
            return null;
        }
        var file = new TempFile(0, "/dev/shm");
        File.WriteAllBytes(file.Path, data);
        return file;
    }

    [Fact]
    public void ReadsDataPagesThroughTheMappingAndLeavesHolesToPread()
    {
        var data = LoopTargetTests.Pattern(4 * MiB, 11);
        using var backing = OnTmpfs(data);
        Assert.SkipWhen(backing is null, "no /dev/shm");
        using var t = new LoopTarget(backing.Path);
        IUserCopyTarget direct = t;
        Assert.True(direct.WantsUserCopy);
        Assert.False(t.UsesRing);
        using var request = new TempFile(MiB);

        Assert.Equal(128 * 1024, direct.ReadToRequest(request.Fd, RequestPosition, MiB + 4096, 128 * 1024));
        Assert.Equal(data.AsSpan(MiB + 4096, 128 * 1024).ToArray(), LoopTargetTests.Slice(request.Path, RequestPosition, 128 * 1024));

        // A punched range is a hole: the mapping is not used for it (nor for a range that only touches it).
        Assert.Equal(0, t.Discard(2 * MiB, MiB));
        var allocated = FileStat.AllocatedBytes(backing.Path);
        Assert.Equal(IUserCopyTarget.NotDirect, direct.ReadToRequest(request.Fd, RequestPosition, 2 * MiB, 4096));
        Assert.Equal(IUserCopyTarget.NotDirect, direct.ReadToRequest(request.Fd, RequestPosition, (2 * MiB) - 4096, 8192));
        Assert.Equal(allocated, FileStat.AllocatedBytes(backing.Path));
        // Beyond the device: not here either.
        Assert.Equal(IUserCopyTarget.NotDirect, direct.ReadToRequest(request.Fd, RequestPosition, (4 * MiB) - 4096, 8192));
    }

    [Fact]
    public void WritesLandInTheFileAndMakeTheRangeReadableThroughTheMapping()
    {
        using var backing = OnTmpfs(new byte[4 * MiB]);
        Assert.SkipWhen(backing is null, "no /dev/shm");
        Assert.Equal(0, Libc.fallocate(backing.Fd, (int)(FallocateMode.PunchHole | FallocateMode.KeepSize), 0, 4 * MiB));
        using var t = new LoopTarget(backing.Path);
        IUserCopyTarget direct = t;
        var data = LoopTargetTests.Pattern(64 * 1024, 12);
        using var request = LoopTargetTests.FileWith([.. new byte[RequestPosition], .. data]);

        // A hole at first: reads go the usual way.
        Assert.Equal(IUserCopyTarget.NotDirect, direct.ReadToRequest(request.Fd, 0, MiB, 4096));
        Assert.Equal(data.Length, direct.WriteFromRequest(request.Fd, RequestPosition, MiB + 512, data.Length, fua: false));
        Assert.Equal(data, LoopTargetTests.Slice(backing.Path, MiB + 512, data.Length));

        // Written pages hold data now, including the partial ones at both ends.
        using var back = new TempFile(MiB);
        Assert.Equal(4096, direct.ReadToRequest(back.Fd, 0, MiB, 4096));
        Assert.Equal(data.AsSpan(0, 4096 - 512).ToArray(), LoopTargetTests.Slice(back.Path, 512, 4096 - 512));
        Assert.Equal(data.Length + 512, direct.ReadToRequest(back.Fd, 0, MiB, data.Length + 512));
        Assert.Equal(IUserCopyTarget.NotDirect, direct.ReadToRequest(back.Fd, 0, MiB, data.Length + 4096 + 4096));
    }

    [Fact]
    public void ReadOnlyAndDiskFilesTakeTheUsualPath()
    {
        using var backing = OnTmpfs(new byte[MiB]);
        Assert.SkipWhen(backing is null, "no /dev/shm");
        using var request = new TempFile(MiB);
        using (var ro = new LoopTarget(backing.Path, readOnly: true))
        {
            Assert.Equal(IUserCopyTarget.NotDirect, ((IUserCopyTarget)ro).WriteFromRequest(request.Fd, 0, 0, 4096, fua: false));
        }
        using (var ring = new LoopTarget(backing.Path, io: LoopIo.Ring))
        {
            Assert.False(((IUserCopyTarget)ring).WantsUserCopy);
        }
        using var file = new TempFile(MiB);
        using var t = new LoopTarget(file.Path, io: LoopIo.Sync);
        Assert.Equal(new DriveInfo(Path.GetTempPath()).DriveFormat == "tmpfs", ((IUserCopyTarget)t).WantsUserCopy);
    }
}
