using UblkSharp.Runtime;

namespace UblkSharp.Tests.Runtime;

/// <summary>
/// Autoclear's question, "is /dev/ublkbN mounted?", asked of mountinfo lines as 6.12 writes them
/// (shapes taken from real ext4, xfs and btrfs mounts of ublk devices).
/// </summary>
public class MountInfoTests
{
    private const string Device = "/dev/ublkb1";
    private const string DevNumber = "259:1";

    // st_dev of ext4 and xfs is the block device's own number.
    private const string Ext4 = "412 27 259:1 / /tmp/ublksharp-fs rw,relatime shared:230 - ext4 /dev/ublkb1 rw";
    private const string Xfs = "413 27 259:1 / /tmp/ublksharp-xfs rw,relatime - xfs /dev/ublkb1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota";
    // btrfs gives every file system an anonymous st_dev; only the source names the device.
    private const string BtrfsSubvol = "414 27 0:52 /@home /tmp/ublksharp-btrfs rw,relatime shared:231 - btrfs /dev/ublkb1 rw,space_cache=v2,subvolid=257,subvol=/@home";
    private const string Escaped = "415 27 259:1 / /tmp/my\\040mount\\011dir rw,relatime shared:232 master:7 - ext4 /dev/ublkb1 rw";

    private static readonly string[] Unrelated =
    [
        "22 27 0:21 / /proc rw,relatime - proc proc rw",
        "27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro",
        "416 27 259:10 / /tmp/other rw,relatime - ext4 /dev/ublkb10 rw",
        "417 27 0:53 / /tmp/other-btrfs rw,relatime - btrfs /dev/ublkb10 rw,space_cache=v2,subvolid=5,subvol=/",
        "418 27 0:54 / /tmp/with\\040space rw,relatime - fuse.sshfs me@localhost:/a\\040b rw,user_id=0",
    ];

    [Theory]
    [InlineData(Ext4)]
    [InlineData(Xfs)]
    [InlineData(BtrfsSubvol)]
    [InlineData(Escaped)]
    public void A_mount_of_the_device_is_seen(string line) =>
        Assert.True(Autoclear.IsMountedIn([.. Unrelated, line], Device, DevNumber));

    [Fact]
    public void Other_devices_mounts_are_not_the_device() =>
        Assert.False(Autoclear.IsMountedIn(Unrelated, Device, DevNumber));

    [Fact]
    public void Btrfs_is_matched_by_its_source_not_its_anonymous_st_dev()
    {
        var mount = MountInfo.Parse(BtrfsSubvol);
        Assert.NotNull(mount);
        Assert.Equal(new MountInfo("0:52", "/@home", "/tmp/ublksharp-btrfs", "btrfs", Device), mount);
        // Asked about another device, the same line is no match.
        Assert.False(Autoclear.IsMountedIn([BtrfsSubvol], "/dev/ublkb2", "259:2"));
    }

    [Fact]
    public void Octal_escapes_in_paths_are_decoded_and_optional_fields_skipped()
    {
        var mount = MountInfo.Parse(Escaped);
        Assert.Equal(new MountInfo("259:1", "/", "/tmp/my mount\tdir", "ext4", Device), mount);
        Assert.Equal("me@localhost:/a b", MountInfo.Parse(Unrelated[4])?.Source);
        Assert.Equal("/tmp/with space", MountInfo.Parse(Unrelated[4])?.MountPoint);
    }

    [Theory]
    [InlineData("")]
    [InlineData("412 27 259:1 / /tmp/x rw,relatime shared:230")]
    [InlineData("412 27 259:1 / /tmp/x rw,relatime shared:230 - ext4")]
    public void A_line_of_another_shape_is_no_mount(string line)
    {
        Assert.Null(MountInfo.Parse(line));
        Assert.False(Autoclear.IsMountedIn([line], Device, DevNumber));
    }
}
